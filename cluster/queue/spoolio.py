"""The spool of one shard as the rest of the shard uses it: asynchronous, one thread, group commit.

Inputs: a `Spool` (spool.py: the SQLite one, or the in-memory one of memspool.py in tests).
Outputs: `open()` (a reader of the stored queue) and `read_chunk` (its next messages, recipients that were in
flight at the last stop made ready again, committed), `commit(batch)` through the `GroupCommitter` (returns
once the transaction is durable), `read_bodies`, `read_headers`, `free_space`, `close`. Every blocking spool
call runs in one dedicated thread, and so does each transaction's fsync; only the write of a transaction (no
fsync) runs on the event loop (commit.py), and the spool lets one call at a time use its connection. The
chunks of a load take turns with the fsyncs in that thread.
Failure modes: every spool failure is a `SpoolError` raised to the caller of the operation that failed. A body
whose record fails its checksum is not returned by `read_bodies`: the record is quarantined (moved aside,
spool.py) in the same spool call and `on_damaged` is told, so the shard forgets it instead of delivering it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from cluster.queue.commit import BackoffChanges, Done, GroupCommitter
from cluster.queue.records import RecipientUpdate, State
from cluster.queue.spool import Batch, Bodies, LoadResult, Quarantined, Spool, SpoolReader
from cluster.queue.usage import UsageEntry

log = logging.getLogger("mtacluster.queue")

T = TypeVar("T")


class SpoolIO:
    def __init__(self, spool: Spool, name: str, batch_max: int,
                 observe: Callable[[int, float], None] | None = None,
                 backoffs: BackoffChanges | None = None) -> None:
        self.spool = spool
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"spool-{name}")
        self._committer = GroupCommitter(spool, self._executor, batch_max, observe, backoffs)
        # Told (on the event loop) of each record quarantined because its body failed its checks.
        self.on_damaged: Callable[[Quarantined], None] = lambda quarantined: None

    async def _call(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def open(self) -> SpoolReader:
        """Open the spool; returns a reader of the queue it holds (read it with `read_chunk`, then close it)."""
        return await self._call(self._open)

    def _open(self) -> SpoolReader:
        self.spool.open()
        return self.spool.reader()

    async def read_chunk(self, reader: SpoolReader, count: int) -> tuple[LoadResult, int] | None:
        """The next `count` messages of the queue (None once all were read); recipients in flight at the last
        stop become ready (committed). Returns them and how many recipients were in flight (possible duplicates)."""
        return await self._call(self._read_chunk, reader, count)

    def _read_chunk(self, reader: SpoolReader, count: int) -> tuple[LoadResult, int] | None:
        loaded = reader.read(count)
        if loaded is None:
            return None
        updates: list[RecipientUpdate] = []
        for message in loaded.messages:
            for recipient in message.recipients:
                if recipient.state is State.IN_FLIGHT:
                    recipient.state = State.READY
                    updates.append(RecipientUpdate.of(message.queue_id, recipient))
        if updates:
            self.spool.commit(Batch(updates=updates))
        return loaded, len(updates)

    async def close_reader(self, reader: SpoolReader) -> None:
        await self._call(reader.close)

    async def run_writer(self) -> None:
        """The group-commit writer task; runs until cancelled."""
        await self._committer.run()

    @property
    def transactions(self) -> int:
        return self._committer.transactions

    async def commit(self, batch: Batch, company: float = 0.0) -> None:
        await self._committer.submit(batch, company)

    def commit_then(self, batch: Batch, done: Done, company: float = 0.0) -> None:
        """Commit `batch` (group commit); `done(None)` once durable, `done(SpoolError)` if not (commit.py)."""
        self._committer.submit_then(batch, done, company)

    @property
    def idle(self) -> asyncio.Event:
        """Set while no commit waits or runs."""
        return self._committer.idle

    async def load_usage(self) -> list[UsageEntry]:
        """The per-user usage entries the spool holds (cluster.queue.usage)."""
        return await self._call(self.spool.load_usage)

    async def read_bodies(self, queue_ids: Iterable[str]) -> Bodies:
        """Bodies for delivery; a damaged record is left out, quarantined, and reported to `on_damaged`."""
        bodies = await self._call(self._read_bodies, list(queue_ids))
        for quarantined in bodies.quarantined:
            self.on_damaged(quarantined)
        return bodies

    def _read_bodies(self, queue_ids: list[str]) -> Bodies:
        bodies = self.spool.read_bodies(queue_ids)
        for queue_id, reason in bodies.damaged.items():
            try:
                bodies.quarantined.append(self.spool.quarantine(queue_id, reason))
            except OSError as exc:  # SpoolError too: the record stays in the spool, still not delivered
                bodies.quarantined.append(Quarantined(queue_id, f"{reason}; not moved aside: {exc}", ""))
        return bodies

    async def read_headers(self, queue_id: str) -> bytes | None:
        return await self._call(self.spool.read_headers, queue_id)

    def free_space(self) -> int:
        return self.spool.free_space()

    async def close(self) -> None:
        try:
            await self._call(self.spool.close)
        finally:
            self._executor.shutdown(wait=True)
