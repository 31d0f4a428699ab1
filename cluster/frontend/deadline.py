"""One read timer per SMTP session, re-armed lazily (what `asyncio.timeout` does per read, for less).

A session reads from its client many times per message, each read under the command or data timeout. A fresh
`asyncio.timeout` (or `wait_for`, which also wraps the read in a task) per read costs a timer handle and a
context each time. `ReadDeadline` keeps one timer per session: `arm(seconds)` before a read only moves the
deadline (the timer is moved only when the new deadline comes earlier than the armed one); `disarm()` after
it. When the timer fires after the deadline while a read is armed, it cancels the session's task, and the
CancelledError surfaces inside the read; the session asks `expired()` to tell its own timeout from a
cancellation by someone else (e.g. the frontend stopping).

Input: the running loop and the session's task. Failure modes: none of its own; a cancellation from elsewhere
that coincides with the deadline is reported as not expired (the other canceller wins, as with asyncio.timeout).
"""

from __future__ import annotations

import asyncio


class ReadDeadline:
    def __init__(self, task: asyncio.Task[object] | asyncio.Task[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = task
        self._deadline: float | None = None  # None: no read is armed
        self._timer: asyncio.TimerHandle | None = None
        self._fired = False

    def arm(self, seconds: float) -> None:
        """A read under a `seconds` timeout starts now."""
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._fire)

    def disarm(self) -> None:
        """The read is over (the timer stays; it does nothing when it fires with no read armed)."""
        self._deadline = None

    def close(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def expired(self) -> bool:
        """After a CancelledError from the armed read: True when it was this deadline's (and nobody else's)."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def _fire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:  # the deadline moved on since the timer was set
            self._timer = self._loop.call_at(deadline, self._fire)
            return
        self._deadline = None
        self._fired = True
        self._task.cancel()
