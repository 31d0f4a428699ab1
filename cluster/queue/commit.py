"""Group commit: many callers, one spool transaction, one fsync.

Callers `await submit(batch)`, or `submit_then(batch, done)` to be called back (`done(None)`, or
`done(SpoolError)`) right where the fsync's completion is handled, before anything else runs: the shard answers
Stored from there (inject.py). The writer task (`run`) does the rest. When no transaction is being made durable, it
merges the batches submitted in this turn of the event loop (up to `batch_max` new messages) and writes them as one
transaction in its next turn (`Spool.write`, on the event loop: no fsync, a fraction of a millisecond);
`Spool.sync` then fsyncs it in the spool's dedicated thread. Batches submitted meanwhile wait, and are merged and
written as soon as that fsync returns, right after the callers it made durable are told (before anything else of
that turn: scheduling and logging what was stored wait, the disk does not). So a batch waits for at most the
fsync already running and then its own, and the event loop never waits for the disk. Destination backoffs changed
since the last transaction (`backoffs`) ride along in the next one, so they are as durable as the recipient changes
that caused them. Each caller's await returns once the transaction holding its batch is durable, or raises the
SpoolError that made it fail (ARCHITECTURE.md contract 1: Stored only after fsync). A batch submitted with
`company` (the outcomes of deliveries) starts no transaction of its own unless none started within that many
seconds: at a steady load it rides along with the next store, one fsync for both. A failed fsync fails every
batch of its transaction, whose changes may nevertheless be in the spool (a message stored so may be delivered
after a restart although its client was told to send it again: a duplicate, never a loss); the spool then
refuses everything until the shard restarts (cluster/queue/spool.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import Future as ThreadFuture
from typing import Protocol

from cluster.queue.spool import Batch, Spool, SpoolError

log = logging.getLogger("mtacluster.queue")

# Told once a batch is durable (None) or failed (the SpoolError); on the event loop.
Done = Callable[[SpoolError | None], None]
Waiting = list[tuple[Batch, Done, bool]]  # (batch, done, urgent: starts a transaction)


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
        self._pending: deque[tuple[Batch, Done, bool]] = deque()
        self._urgent = 0  # pending batches that start a transaction (submitted without company)
        self._syncing = False  # a transaction is written and its fsync runs in the spool's thread
        self._wake = asyncio.Event()
        # The deadline of the parts that wait for company (`submit`), while one waits; `_due` once it passed.
        self._timer: asyncio.TimerHandle | None = None
        self._due = False
        # Set while no batch waits and no fsync runs (a shard stopping, tests).
        self.idle = asyncio.Event()
        self.idle.set()
        self.transactions = 0

    async def submit(self, batch: Batch, company: float = 0.0) -> None:
        """Commit `batch`; returns once it is durable. `company` > 0: no transaction of its own is started for
        it, it rides along with the next one someone else starts, or starts one itself after `company` seconds
        (for changes that need to be durable soon, not at once: the outcomes of deliveries)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit_then(batch, lambda error: _settle(future, error), company)
        await future

    def submit_then(self, batch: Batch, done: Done, company: float = 0.0) -> None:
        """Commit `batch` with the next transaction (`company`: as for `submit`); `done` is called on the event
        loop once it is durable."""
        urgent = company <= 0
        self._pending.append((batch, done, urgent))
        self.idle.clear()
        if urgent:
            self._urgent += 1
            if not self._syncing:
                self._wake.set()
        elif self._timer is None and not self._due:
            self._timer = asyncio.get_running_loop().call_later(company, self._alone)

    def _alone(self) -> None:
        self._timer = None
        self._due = True
        if not self._syncing:
            self._wake.set()

    def _ready(self) -> bool:
        """Whether the waiting batches start a transaction now (one urgent, or the company's time is up)."""
        return bool(self._pending) and (self._urgent > 0 or self._due)

    async def run(self) -> None:
        """The writer task: writes waiting batches whenever no fsync runs. Runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._flush()

    def _flush(self) -> None:
        """Write the waiting batches as one transaction and start its fsync (on the event loop)."""
        while self._ready() and not self._syncing:
            taken = self._take()
            if not self._pending:  # whatever waited for company goes now
                self._due = False
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            merged = _merge(taken, self._backoffs.take() if self._backoffs is not None else {})
            try:
                self._start(taken, merged)
            except Exception as exc:  # the committer must outlive any failed transaction
                self._failed(taken, merged, exc)  # and the next batches are tried on their own
        if not self._pending and not self._syncing:
            self.idle.set()

    def _start(self, taken: Waiting, merged: Batch) -> None:
        started = time.perf_counter()
        self._spool.write(merged)
        syncing = self._executor.submit(self._spool.sync)
        self._syncing = True
        loop = asyncio.get_running_loop()
        syncing.add_done_callback(lambda done: loop.call_soon_threadsafe(self._synced, done, taken, merged, started))

    def _synced(self, done: ThreadFuture[None], taken: Waiting, merged: Batch, started: float) -> None:
        """The fsync returned (on the event loop): answer its callers, then write what waited meanwhile."""
        self._syncing = False
        exc = done.exception()
        if exc is not None:
            self._failed(taken, merged, exc)
        else:
            self.transactions += 1
            _tell(taken, None)
            if self._observe is not None:
                self._observe(len(merged.stores), time.perf_counter() - started)
        if self._ready():
            # What waited meanwhile is written and its fsync started now, right after the callers were answered
            # (their Stored are sent), before the rest of this turn (scheduling and logging what was stored):
            # the disk works while the event loop does that.
            self._flush()
        elif not self._pending:
            self.idle.set()

    def _failed(self, taken: Waiting, merged: Batch, exc: BaseException) -> None:
        failure = exc if isinstance(exc, SpoolError) else SpoolError(f"spool transaction failed: {exc!r}")
        if not isinstance(exc, SpoolError):
            log.error("unexpected error in a spool transaction", exc_info=exc)
        _tell(taken, failure)
        if self._backoffs is not None:
            self._backoffs.give_back(merged.backoffs)

    def _take(self) -> Waiting:
        taken: Waiting = []
        stored = 0
        while self._pending:
            part = self._pending[0][0]
            if taken and stored + len(part.stores) > self._batch_max:
                break
            stored += len(part.stores)
            taken.append(entry := self._pending.popleft())
            self._urgent -= entry[2]
        return taken


def _tell(taken: Waiting, error: SpoolError | None) -> None:
    for _, done, _ in taken:
        try:
            done(error)
        except Exception:  # one caller's bug must not keep the others waiting
            log.exception("a caller of a spool transaction failed to take its outcome")


def _settle(future: asyncio.Future[None], error: SpoolError | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _merge(taken: Waiting, backoffs: dict[str, float]) -> Batch:
    if len(taken) == 1 and not backoffs:
        return taken[0][0]  # the usual case under light load: nothing to merge
    merged = Batch(backoffs=backoffs)
    for part, _, _ in taken:
        merged.stores.extend(part.stores)
        merged.bodies.update(part.bodies)
        merged.updates.extend(part.updates)
        merged.flags.update(part.flags)
        merged.removals.extend(part.removals)
        merged.usage_adds.extend(part.usage_adds)
        merged.usage_removals.extend(part.usage_removals)
        merged.backoffs.update(part.backoffs)
        merged.in_flight.update(part.in_flight)
    merged.backoffs.update(backoffs)  # the latest change of a destination wins
    return merged
