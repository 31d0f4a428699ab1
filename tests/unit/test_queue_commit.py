"""Group commit: injects that arrive while a transaction is made durable share the next one."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.queue.commit import GroupCommitter
from cluster.queue.records import Message, Recipient
from cluster.queue.spool import Batch, LoadResult, Quarantined, SpoolError


class SlowSpool:
    """Records each transaction's size and the thread of each step; the first fsync (`sync`) blocks until released,
    so later submits pile up."""

    def __init__(self) -> None:
        self.commits: list[int] = []
        self.release = threading.Event()
        self.fail_next = False
        self.fail_sync = False
        self.threads: set[tuple[str, int]] = set()

    def commit(self, batch: Batch) -> None:
        self.write(batch)
        self.sync()

    def write(self, batch: Batch) -> None:
        self.threads.add(("write", threading.get_ident()))
        if self.fail_next:
            self.fail_next = False
            raise SpoolError("disk on fire")
        self.commits.append(len(batch.stores))

    def sync(self) -> None:
        self.threads.add(("sync", threading.get_ident()))
        self.release.wait(5)
        if self.fail_sync:
            self.fail_sync = False
            raise SpoolError("fsync failed")

    def open(self) -> None: ...

    def close(self) -> None: ...

    def load(self) -> LoadResult:
        return LoadResult([], [])

    def read_bodies(self, queue_ids: Iterable[str]) -> dict[str, bytes]:
        return {}

    def read_headers(self, queue_id: str) -> bytes | None:
        return None

    def quarantine(self, queue_id: str, reason: str) -> Quarantined:
        raise NotImplementedError

    def free_space(self) -> int:
        return 1 << 40


def one(queue_id: str) -> Batch:
    return Batch(stores=[Message(queue_id, "", 0.0, [Recipient(0, "a@b.test")], 1)], bodies={queue_id: b"x"})


@contextlib.asynccontextmanager
async def running(spool: SlowSpool, batch_max: int = 8) -> AsyncIterator[GroupCommitter]:
    """A committer on `spool` with its writer task running (and the spool's thread), stopped at the end."""
    with ThreadPoolExecutor(1) as executor:
        committer = GroupCommitter(spool, executor, batch_max=batch_max)
        runner = asyncio.create_task(committer.run())
        try:
            yield committer
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def test_concurrent_submits_share_transactions() -> None:
    spool = SlowSpool()
    async with running(spool) as committer:
        first = asyncio.create_task(committer.submit(one("Q0")))
        await asyncio.sleep(0)
        others = [asyncio.create_task(committer.submit(one(f"Q{i}"))) for i in range(1, 20)]
        await asyncio.sleep(0.05)
        assert not first.done()  # nobody is answered before their transaction is durable
        assert spool.commits == [1]  # the others wait for that fsync, then share transactions
        spool.release.set()
        await asyncio.gather(first, *others)
    assert sum(spool.commits) == 20
    assert spool.commits[0] == 1 and max(spool.commits) == 8  # batched, capped at batch_max
    assert committer.transactions == len(spool.commits) <= 4


async def test_the_event_loop_writes_and_the_spool_thread_fsyncs() -> None:
    """The loop never waits for the disk: only the fsync runs in the spool's thread."""
    spool = SlowSpool()
    spool.release.set()
    async with running(spool) as committer:
        await asyncio.gather(*(committer.submit(one(f"Q{i}")) for i in range(5)))
    loop_thread = threading.get_ident()
    assert {("write", loop_thread)} == {t for t in spool.threads if t[0] == "write"}
    syncs = {t for t in spool.threads if t[0] == "sync"}
    assert len(syncs) == 1 and loop_thread not in {ident for _, ident in syncs}


async def test_a_failed_fsync_fails_every_submit_of_its_transaction() -> None:
    spool = SlowSpool()
    spool.fail_sync = True
    async with running(spool) as committer:
        first = asyncio.create_task(committer.submit(one("A")))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(committer.submit(one("B")))  # waits for the next transaction
        await asyncio.sleep(0.01)
        spool.release.set()
        with pytest.raises(SpoolError, match="fsync failed"):
            await first
        await second  # its own transaction, durable
    assert spool.commits == [1, 1] and committer.transactions == 1


async def test_a_failed_transaction_fails_every_submit_in_it() -> None:
    spool = SlowSpool()
    spool.fail_next = True
    spool.release.set()
    async with running(spool) as committer:
        results = await asyncio.gather(committer.submit(one("A")), committer.submit(one("B")),
                                       return_exceptions=True)
        assert all(isinstance(r, SpoolError) for r in results)
        await committer.submit(one("C"))
    assert spool.commits == [1]


@pytest.mark.parametrize("batch_max", [1, 3])
async def test_batch_max_is_respected(batch_max: int) -> None:
    spool = SlowSpool()
    spool.release.set()
    async with running(spool, batch_max=batch_max) as committer:
        await asyncio.gather(*(committer.submit(one(f"Q{i}")) for i in range(10)))
    assert sum(spool.commits) == 10 and max(spool.commits) <= batch_max


async def test_the_writer_survives_an_unexpected_error() -> None:
    class BrokenOnce(SlowSpool):
        calls = 0

        def write(self, batch: Batch) -> None:
            self.calls += 1
            if self.calls == 1:
                raise KeyError("a bug")
            super().write(batch)

    spool = BrokenOnce()
    spool.release.set()
    async with running(spool) as committer:
        with pytest.raises(SpoolError, match="a bug"):
            await committer.submit(one("A"))
        await committer.submit(one("B"))
    assert spool.commits == [1]


async def test_a_part_that_waits_for_company_rides_along_with_the_next_transaction() -> None:
    """Issue 12: outcomes (submitted with `company`) start no transaction of their own while stores follow."""
    spool = SlowSpool()
    spool.release.set()
    async with running(spool) as committer:
        waiting = asyncio.create_task(committer.submit(one("w1"), company=60))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done() and spool.commits == [] and committer.transactions == 0
        await committer.submit(one("s1"))
        await waiting
        assert spool.commits == [2] and committer.transactions == 1
        # Alone, it goes once its time is up.
        await asyncio.wait_for(committer.submit(one("w2"), company=0.01), 5)
        assert spool.commits == [2, 1]


async def test_what_waited_is_written_as_soon_as_the_fsync_returns() -> None:
    """Issue 12 (accept latency): the batches that waited for an fsync are written, and their fsync started, in
    the turn its callers are told, before whatever those callers left for later (the shard schedules and logs
    what was stored after answering Stored): the disk does not wait for that work."""
    spool = SlowSpool()
    seen: list[list[int]] = []
    loop = asyncio.get_running_loop()
    async with running(spool) as committer:
        committer.submit_then(one("A"), lambda error: loop.call_soon(lambda: seen.append(list(spool.commits))))
        await asyncio.sleep(0.01)  # A's fsync runs, blocked
        waiting = asyncio.create_task(committer.submit(one("B")))
        await asyncio.sleep(0.01)
        assert spool.commits == [1]  # B waits for A's fsync
        spool.release.set()
        await waiting
    assert seen == [[1, 1]]  # B was written before A's caller's follow-up ran
