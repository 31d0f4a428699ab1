"""Group commit: many callers, one spool transaction.

Callers `await submit(batch)`; a single writer task merges every batch that arrived while the previous
transaction was running (up to `batch_max` new messages) into one `Spool.commit`, run in the spool's
dedicated thread. Destination backoffs changed since the last transaction (`backoffs`) ride along in the
next one, so they are as durable as the recipient changes that caused them. Each caller's await returns
once the transaction holding its batch is durable, or raises
the SpoolError that made it fail (ARCHITECTURE.md contract 1: Stored only after fsync).
A batch submitted with `company` (the outcomes of deliveries) starts no transaction of its own unless none
started within that many seconds: at a steady load it rides along with the next store, one fsync for both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

from cluster.queue.spool import Batch, Spool, SpoolError

log = logging.getLogger("mtacluster.queue")


class BackoffChanges(Protocol):
    """Destination backoffs changed in memory and not yet written (scheduler.py): every transaction takes them."""

    def take(self) -> dict[str, float]: ...

    def give_back(self, changes: dict[str, float]) -> None: ...


class GroupCommitter:
    def __init__(self, spool: Spool, executor: Executor, batch_max: int,
                 observe: Callable[[int, float], None] | None = None,
                 backoffs: BackoffChanges | None = None) -> None:
        self._spool = spool
        self._backoffs = backoffs
        self._executor = executor
        self._batch_max = batch_max
        self._observe = observe
        self._pending: deque[tuple[Batch, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        # The deadline of the parts that wait for company (`submit`), while one waits.
        self._timer: asyncio.TimerHandle | None = None
        self.transactions = 0

    async def submit(self, batch: Batch, company: float = 0.0) -> None:
        """Commit `batch`; returns once it is durable. `company` > 0: no transaction of its own is started for
        it, it rides along with the next one someone else starts, or starts one itself after `company` seconds
        (for changes that need to be durable soon, not at once: the outcomes of deliveries)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((batch, future))
        if company <= 0:
            self._wake.set()
        elif self._timer is None:
            self._timer = loop.call_later(company, self._alone)
        await future

    def _alone(self) -> None:
        self._timer = None
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                if self._timer is not None:  # whatever waited for company goes now
                    self._timer.cancel()
                    self._timer = None
                taken = self._take()
                merged = Batch()
                for part, _ in taken:
                    merged.stores.extend(part.stores)
                    merged.bodies.update(part.bodies)
                    merged.updates.extend(part.updates)
                    merged.flags.update(part.flags)
                    merged.removals.extend(part.removals)
                    merged.usage_adds.extend(part.usage_adds)
                    merged.usage_removals.extend(part.usage_removals)
                    merged.backoffs.update(part.backoffs)
                    merged.in_flight.update(part.in_flight)
                if self._backoffs is not None:
                    merged.backoffs.update(self._backoffs.take())
                started = time.perf_counter()
                try:
                    await loop.run_in_executor(self._executor, self._spool.commit, merged)
                except Exception as exc:  # the writer must outlive any failed transaction
                    failure = exc if isinstance(exc, SpoolError) else SpoolError(f"spool transaction failed: {exc!r}")
                    if not isinstance(exc, SpoolError):
                        log.exception("unexpected error in a spool transaction")
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(failure)
                    if self._backoffs is not None:
                        self._backoffs.give_back(merged.backoffs)
                    continue
                self.transactions += 1
                if self._observe is not None:
                    self._observe(len(merged.stores), time.perf_counter() - started)
                for _, future in taken:
                    if not future.done():
                        future.set_result(None)

    def _take(self) -> list[tuple[Batch, asyncio.Future[None]]]:
        taken: list[tuple[Batch, asyncio.Future[None]]] = []
        stored = 0
        while self._pending:
            part = self._pending[0][0]
            if taken and stored + len(part.stores) > self._batch_max:
                break
            stored += len(part.stores)
            taken.append(self._pending.popleft())
        return taken
