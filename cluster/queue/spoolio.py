"""The spool of one shard as the rest of the shard uses it: asynchronous, one thread, group commit.

Inputs: a `Spool` (spool.py: the SQLite one, or the in-memory one of memspool.py in tests).
Outputs: `open_and_recover()` (the stored messages, recipients that were in flight at the last stop made
ready again), `commit(batch)` through the `GroupCommitter` (returns once the transaction is durable),
`read_bodies`, `read_headers`, `free_space`, `close`. Every blocking spool call runs in one dedicated thread,
so the spool never sees two calls at once.
Failure modes: every spool failure is a `SpoolError` raised to the caller of the operation that failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from cluster.queue.commit import BackoffChanges, GroupCommitter
from cluster.queue.records import RecipientUpdate, State
from cluster.queue.spool import Batch, LoadResult, Spool
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

    async def _call(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def open_and_recover(self) -> tuple[LoadResult, int]:
        """Open and load the spool; recipients in flight at the last stop become ready (committed).

        Returns what was loaded and how many recipients were in flight (each a possible duplicate)."""
        return await self._call(self._open_and_recover)

    def _open_and_recover(self) -> tuple[LoadResult, int]:
        self.spool.open()
        loaded = self.spool.load()
        updates: list[RecipientUpdate] = []
        for message in loaded.messages:
            for recipient in message.recipients:
                if recipient.state is State.IN_FLIGHT:
                    recipient.state = State.READY
                    updates.append(RecipientUpdate.of(message.queue_id, recipient))
        if updates:
            self.spool.commit(Batch(updates=updates))
        return loaded, len(updates)

    async def run_writer(self) -> None:
        """The group-commit writer task; runs until cancelled."""
        await self._committer.run()

    @property
    def transactions(self) -> int:
        return self._committer.transactions

    async def commit(self, batch: Batch) -> None:
        await self._committer.submit(batch)

    async def load_usage(self) -> list[UsageEntry]:
        """The per-user usage entries the spool holds (cluster.queue.usage)."""
        return await self._call(self.spool.load_usage)

    async def read_bodies(self, queue_ids: Iterable[str]) -> dict[str, bytes]:
        return await self._call(self.spool.read_bodies, list(queue_ids))

    async def read_headers(self, queue_id: str) -> bytes | None:
        return await self._call(self.spool.read_headers, queue_id)

    def free_space(self) -> int:
        return self.spool.free_space()

    async def close(self) -> None:
        try:
            await self._call(self.spool.close)
        finally:
            self._executor.shutdown(wait=True)
