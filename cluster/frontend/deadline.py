"""The read timeouts of all the SMTP sessions of a frontend process, kept by one periodic sweep.

A session waits for its client many times per message, each wait under the command or data timeout (minutes),
and most connections live a few milliseconds. A timer per session (or per read) costs a timer handle made and
cancelled per connection; `Deadlines` keeps one timer for all of them instead: a watched item sets its own
`deadline` (a `loop.time()` value, or None while it waits for nobody), and a sweep every `interval` seconds calls
`expired()` on each item whose deadline has passed. A timeout therefore fires up to `interval` late, which is
why the frontend makes `interval` a small fraction of its shortest timeout. The sweep runs only while something
is watched.

Input: the items (any object with a `deadline` attribute and an `expired()` method). Output: calls to
`expired()`. Failure modes: an `expired()` that raises is logged and the sweep goes on with the other items.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Watched(Protocol):
    # When the item must have heard from its client (loop.time()); None: no wait is running.
    deadline: float | None

    def expired(self) -> None:
        """The deadline passed (it is None again when this is called)."""


class Deadlines:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._watched: dict[Watched, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, item: Watched) -> None:
        self._watched[item] = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._sweep)

    def forget(self, item: Watched) -> None:
        self._watched.pop(item, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watched.clear()

    def _sweep(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = [item for item in self._watched if item.deadline is not None and item.deadline <= now]
        for item in due:
            item.deadline = None
            try:
                item.expired()
            except Exception:  # one item's bug must not stop the timeouts of the others
                log.exception("a read timeout handler failed")
        if self._watched:
            self._timer = loop.call_later(self.interval, self._sweep)
