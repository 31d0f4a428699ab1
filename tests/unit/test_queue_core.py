"""The shard's queue manager (cluster/queue/core.py) without sockets: an in-memory spool and a virtual clock.

Bus messages go in through `ShardCore.handle`, answers come out through a `send` that keeps them in a list;
the dispatcher runs only when a test calls `dispatch_once`, and time moves only when a test moves it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from cluster import logs
from cluster.bus.schemas import (
    AdminReply,
    AdminRequest,
    BusMessage,
    Deliver,
    Heartbeat,
    HeartbeatAck,
    Inject,
    InjectRefused,
    Outcome,
    OutcomeKind,
    Result,
    Stored,
)
from cluster.config import config_from_dict
from cluster.queue.commit import Done
from cluster.queue.core import ShardCore
from cluster.queue.memspool import MemorySpool
from cluster.queue.records import Message, Recipient, State
from cluster.queue.spool import Batch

START = 1_700_000_000.0
BODY = b"From: a@sender.test\r\nSubject: hi\r\nMessage-ID: <m1@sender.test>\r\n\r\nhello\r\n"
FRONTEND, WORKER, CLI = b"frontend", b"worker", b"cli"


class VirtualClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Peer:
    """What the shard sent, per identity."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, BusMessage]] = []

    async def send(self, identity: bytes, message: BusMessage) -> None:
        self.sent.append((identity, message))

    def count(self, kind: type[BusMessage]) -> int:
        return sum(isinstance(m, kind) for _, m in self.sent)

    def take(self, kind: type[BusMessage], identity: bytes | None = None) -> list[Any]:
        """Remove and return the messages of one type (sent to `identity`)."""
        found = [m for i, m in self.sent if isinstance(m, kind) and (identity is None or i == identity)]
        self.sent = [(i, m) for i, m in self.sent if not any(m is f for f in found)]
        return found


class Harness:
    def __init__(self, core: ShardCore, spool: MemorySpool, clock: VirtualClock, peer: Peer) -> None:
        self.core, self.spool, self.clock, self.peer = core, spool, clock, peer
        self._req = 0

    async def inject(self, sender: str, recipients: list[str], body: bytes = BODY) -> str:
        self._req += 1
        await self.core.handle(FRONTEND, Inject(self._req, sender, recipients, body))
        await self.core.idle()
        (reply,) = self.peer.take(Stored, FRONTEND) or self.peer.take(InjectRefused, FRONTEND)
        assert isinstance(reply, Stored), reply
        return reply.queue_id

    async def heartbeat(self, free: int = 10, in_flight: list[str] | None = None, name: str = "w") -> None:
        await self.core.handle(WORKER, Heartbeat(name, free, in_flight or []))
        self.peer.take(HeartbeatAck, WORKER)

    async def deliveries(self) -> list[Deliver]:
        await self.core.dispatcher.dispatch_once()
        jobs: list[Deliver] = self.peer.take(Deliver, WORKER)
        return jobs

    async def result(self, job: Deliver, status: str, code: int, enhanced: str, text: str = "words",
                     remote: str = "mx.test[192.0.2.1]", worker: str = "w", port: int = 0,
                     connect: float = 0.0, transfer: float = 0.0) -> None:
        outcomes = [Outcome(r, OutcomeKind(status), code, enhanced, text, remote, port, connect, transfer)
                    for r in job.recipients]
        await self.core.handle(WORKER, Result(job.job_id, worker, outcomes))
        await self.core.idle()

    async def admin(self, op: str, **args: Any) -> AdminReply:
        self._req += 1
        await self.core.handle(CLI, AdminRequest(self._req, op, args))
        await self.core.idle()
        (reply,) = self.peer.take(AdminReply, CLI)
        assert isinstance(reply, AdminReply)
        return reply

    def states(self, queue_id: str) -> list[State]:
        return [r.state for r in self.core.scheduler.messages[queue_id].recipients]


@asynccontextmanager
async def shard(spool: MemorySpool | None = None, clock: VirtualClock | None = None, loaded: bool = True,
                **queue: Any) -> AsyncIterator[Harness]:
    """A core on `spool`, its queue loaded (or, with `loaded=False`, only its spool opened: `load_queue`
    is the test's to run, as shard.py runs it in the background)."""
    config = config_from_dict({"queue": {"retry_first": 300, "retry_max": 4000, "max_lifetime": 86400, **queue},
                               "metrics": {"listen": ""}}, environ={})
    spool = spool or MemorySpool()
    clock = clock or VirtualClock()
    peer = Peer()
    core = ShardCore(config, 0, spool, clock, peer.send)
    await (core.load() if loaded else core.open_spool())
    core.ready = True
    writer = asyncio.create_task(core.io.run_writer())
    try:
        yield Harness(core, spool, clock, peer)
    finally:
        await core.settle(5)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await core.close()


async def until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_store_dispatch_and_outcomes() -> None:
    async with shard() as h:
        queue_id = await h.inject("a@sender.test", ["x@a.test", "y@a.test", "z@b.test"])
        assert h.spool.recipients(queue_id) == [("x@a.test", "ready"), ("y@a.test", "ready"), ("z@b.test", "ready")]
        await h.heartbeat()
        jobs = {job.domain: job for job in await h.deliveries()}
        assert sorted(jobs) == ["a.test", "b.test"] and jobs["a.test"].recipients == ["x@a.test", "y@a.test"]
        assert h.spool.recipients(queue_id)[2] == ("z@b.test", "in_flight")  # marked before it was sent
        await h.result(jobs["a.test"], "delivered", 250, "2.0.0", "ok")
        await h.result(jobs["b.test"], "failed", 550, "5.1.1", "no such user")
        # Every recipient done: the message left the spool, and a DSN about z@b.test went to the sender.
        assert queue_id not in h.core.scheduler.messages and queue_id not in h.spool.queue_ids()
        (dsn_id,) = h.spool.queue_ids()
        dsn = h.core.scheduler.messages[dsn_id]
        assert dsn.sender == "" and [r.address for r in dsn.recipients] == ["a@sender.test"]
        body = h.spool.read_bodies([dsn_id])[dsn_id]
        assert b"Final-Recipient: rfc822; z@b.test" in body and b"Status: 5.1.1" in body
        assert h.core.scheduler.workers["w"].credits == 10


async def test_retry_schedule_then_expiry_on_a_virtual_clock() -> None:
    async with shard(retry_first=300, retry_max=600, max_lifetime=3600) as h:
        queue_id = await h.inject("a@sender.test", ["r@slow.test"])
        await h.heartbeat()
        (job,) = await h.deliveries()
        await h.result(job, "deferred", 451, "4.2.0", "mailbox busy")
        recipient = h.core.scheduler.messages[queue_id].recipients[0]
        assert recipient.state is State.DEFERRED and 270 <= recipient.next_attempt - START <= 330
        h.clock.advance(250)
        h.core.tick(0)
        await h.heartbeat()  # the worker keeps in touch
        assert await h.deliveries() == []  # not due yet
        h.clock.advance(100)
        h.core.tick(1)
        await h.heartbeat()
        (again,) = await h.deliveries()
        assert again.attempt == 2
        h.clock.advance(3600)  # past queue.max_lifetime: the next deferral gives up
        await h.result(again, "deferred", 451, "4.2.0", "mailbox busy")
        assert queue_id not in h.core.scheduler.messages
        (dsn_id,) = h.spool.queue_ids()
        body = h.spool.read_bodies([dsn_id])[dsn_id]
        assert b"Status: 4.4.7" in body and b"mailbox busy" in body


async def test_restart_requeues_what_was_in_flight() -> None:
    spool, clock = MemorySpool(), VirtualClock()
    async with shard(spool, clock) as h:
        queue_id = await h.inject("a@sender.test", ["r@c.test"])
        await h.heartbeat()
        await h.deliveries()
        assert spool.recipients(queue_id) == [("r@c.test", "in_flight")]
    async with shard(spool, clock) as h:
        assert h.states(queue_id) == [State.READY]
        assert spool.recipients(queue_id) == [("r@c.test", "ready")]


async def deferred_messages(h: Harness, count: int) -> list[str]:
    queue_ids = [await h.inject("a@sender.test", [f"r{n}@later.test"]) for n in range(count)]
    await h.heartbeat(free=count)
    for job in await h.deliveries():
        await h.result(job, "deferred", 451, "4.2.0", "later", remote="")
    assert all(h.states(q) == [State.DEFERRED] for q in queue_ids)
    return queue_ids


async def test_overlapping_flushes_make_each_recipient_ready_once() -> None:
    """The second flush decides while the first one's transaction is being written; the dispatcher runs
    between the two commits. Each recipient must still be dispatched exactly once."""
    async with shard() as h:
        queue_ids = await deferred_messages(h, 20)
        h.core.scheduler.clear_backoff()
        dispatcher = asyncio.create_task(h.core.dispatcher.run())
        try:
            h.spool.hold_commits()
            await h.core.handle(CLI, AdminRequest(1, "flush", {}))
            await until(h.spool.waiting.is_set)  # the first flush's transaction is being written
            await h.core.handle(CLI, AdminRequest(2, "flush", {}))
            await asyncio.sleep(0)
            h.spool.release_commits()
            await h.core.idle()
            await until(lambda: h.peer.count(Deliver) >= 20)
            await h.core.dispatcher.dispatch_once()
        finally:
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
        replies = sorted(h.peer.take(AdminReply, CLI), key=lambda r: r.req)
        assert [r.ok for r in replies] == [True, True]
        assert sum(r.data["flushed"] for r in replies) == 20
        delivered = [job.queue_id for job in h.peer.take(Deliver, WORKER)]
        assert sorted(delivered) == sorted(queue_ids)  # each once
        assert all(h.states(q) == [State.IN_FLIGHT] for q in queue_ids)


@pytest.mark.parametrize("op", ["hold", "delete", "bounce"])
async def test_flush_racing_another_admin_operation(op: str) -> None:
    async with shard() as h:
        (queue_id,) = await deferred_messages(h, 1)
        dispatcher = asyncio.create_task(h.core.dispatcher.run())
        try:
            h.spool.hold_commits()
            await h.core.handle(CLI, AdminRequest(1, "flush", {}))
            await until(h.spool.waiting.is_set)
            await h.core.handle(CLI, AdminRequest(2, op, {"queue_id": queue_id}))
            await asyncio.sleep(0)
            h.spool.release_commits()
            await h.core.idle()
            # Whoever won, the dispatcher has had its turn once nothing is locked and no commit is pending.
            await until(lambda: h.core.dispatcher.idle)
        finally:
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
        flushed, other = sorted(h.peer.take(AdminReply, CLI), key=lambda r: r.req)
        assert flushed.ok and other.ok and flushed.data == {"flushed": 1}
        await h.core.dispatcher.dispatch_once()
        jobs = h.peer.take(Deliver, WORKER)
        assert len(jobs) <= 1
        if op == "hold":
            # Either the dispatcher took the recipient before the hold was decided (nothing left to hold), or
            # the hold came first (nothing sent); never both, and the spool says what memory says.
            assert (len(jobs), other.data["held"]) in ((1, 0), (0, 1))
            state = h.states(queue_id)[0]
            assert state is (State.IN_FLIGHT if jobs else State.HELD)
            assert h.spool.recipients(queue_id) == [("r0@later.test", state.value)]
        else:
            # delete/bounce take the recipient even in flight; memory and spool agree on the end.
            assert other.data[f"{op}d"] == 1
            assert queue_id not in h.core.scheduler.messages and queue_id not in h.spool.queue_ids()


class CountingReads:
    """Counts the spool's body reads (wraps MemorySpool.read_bodies)."""

    def __init__(self, spool: MemorySpool) -> None:
        self.count = 0
        self._read = spool.read_bodies
        spool.read_bodies = self  # type: ignore[method-assign]

    def __call__(self, queue_ids: Any) -> dict[str, bytes]:
        self.count += 1
        return self._read(queue_ids)


async def test_a_message_dispatched_at_once_costs_one_transaction() -> None:
    """Issue 12: with a worker's credit waiting, a new message is stored in flight by the transaction that stores
    it; its Deliver needs no transaction and no read of its own, and its completion is the second and last."""
    async with shard() as h:
        await h.heartbeat(free=5)
        reads = CountingReads(h.spool)
        before = h.core.io.transactions
        queue_id = await h.inject("a@sender.test", ["r@d.test"])
        assert h.spool.recipients(queue_id) == [("r@d.test", "in_flight")] and h.states(queue_id) == [State.READY]
        (job,) = await h.deliveries()
        assert job.body == BODY and job.recipients == ["r@d.test"]
        assert h.core.io.transactions == before + 1 and reads.count == 0
        assert h.states(queue_id) == [State.IN_FLIGHT]
        await h.result(job, "delivered", 250, "2.0.0")
        assert queue_id not in h.spool.queue_ids() and h.core.io.transactions == before + 2
        assert not h.core.scheduler.fresh and h.core.scheduler.fresh_bytes == 0


async def test_a_message_waiting_for_a_worker_is_stored_ready_and_marked_before_its_deliver() -> None:
    async with shard() as h:
        queue_id = await h.inject("a@sender.test", ["r@d.test"])  # no worker has credit: it waits
        assert h.spool.recipients(queue_id) == [("r@d.test", "ready")]
        await h.heartbeat(free=5)
        reads = CountingReads(h.spool)
        before = h.core.io.transactions
        (job,) = await h.deliveries()
        assert job.body == BODY and reads.count == 1
        assert h.core.io.transactions == before + 1 and h.spool.recipients(queue_id) == [("r@d.test", "in_flight")]


async def test_a_change_before_the_first_dispatch_makes_the_dispatch_mark_in_flight_again() -> None:
    """Held and released before its first Deliver, a message stored in flight is ready in the spool again: its
    dispatch must write the mark, or a crash after the Deliver would not count it (ARCHITECTURE.md contract 2)."""
    async with shard() as h:
        await h.heartbeat(free=5)
        queue_id = await h.inject("a@sender.test", ["r@d.test"])
        assert (await h.admin("hold", queue_id=queue_id)).ok
        assert (await h.admin("release", queue_id=queue_id)).ok
        assert h.spool.recipients(queue_id) == [("r@d.test", "ready")]
        (job,) = await h.deliveries()
        assert job.body == BODY and h.spool.recipients(queue_id) == [("r@d.test", "in_flight")]


async def test_mail_stored_in_flight_is_counted_after_a_crash_and_written_back_on_a_clean_stop() -> None:
    spool = MemorySpool()
    async with shard(spool) as h:
        await h.heartbeat(free=5)
        crashed = await h.inject("a@sender.test", ["r@d.test"])
    before = REGISTRY.get_sample_value("mtacluster_queue_possible_duplicates_total", {"shard": "0"}) or 0.0
    async with shard(spool) as h:  # the first shard stopped without unmark: a crash, as far as the spool knows
        after = REGISTRY.get_sample_value("mtacluster_queue_possible_duplicates_total", {"shard": "0"})
        assert after == before + 1 and h.states(crashed) == [State.READY]
        assert spool.recipients(crashed) == [("r@d.test", "ready")]
        await h.heartbeat(free=5)
        clean = await h.inject("a@sender.test", ["s@d.test"])
        assert spool.recipients(clean) == [("s@d.test", "in_flight")]
        await h.core.dispatcher.unmark()
        assert spool.recipients(clean) == [("s@d.test", "ready")] and not h.core.scheduler.fresh
        jobs = await h.deliveries()
        assert sorted(j.queue_id for j in jobs) == sorted([crashed, clean])
        assert spool.recipients(clean) == [("s@d.test", "in_flight")]


async def test_admin_change_fails_when_the_spool_cannot_commit() -> None:
    async with shard() as h:
        await deferred_messages(h, 1)
        queue_id = await h.inject("a@sender.test", ["r@d.test"])
        # A worker has credit: the message was stored in flight, to be dispatched at once (dispatch.py).
        assert h.spool.recipients(queue_id) == [("r@d.test", "in_flight")]
        for op in ("delete", "bounce", "hold"):
            h.spool.fail_commits(1)
            reply = await h.admin(op, queue_id=queue_id)
            assert not reply.ok and "spool error" in reply.error and "injected failure" in reply.error
            assert h.states(queue_id) == [State.READY]
            assert h.spool.recipients(queue_id) == [("r@d.test", "in_flight")]
        h.spool.fail_commits(1)
        flushed = await h.admin("flush")
        assert not flushed.ok and "spool error" in flushed.error
        deleted = await h.admin("delete", queue_id=queue_id)
        assert deleted.ok and deleted.data == {"queue_id": queue_id, "deleted": 1}
        assert queue_id not in h.spool.queue_ids()


async def test_a_failed_outcome_commit_makes_the_recipients_ready_again() -> None:
    async with shard() as h:
        queue_id = await h.inject("a@sender.test", ["r@e.test"])
        await h.heartbeat()
        (job,) = await h.deliveries()
        h.spool.fail_commits(1)
        await h.result(job, "delivered", 250, "2.0.0", "ok")
        assert h.states(queue_id) == [State.READY]
        (again,) = await h.deliveries()
        assert again.queue_id == queue_id


async def test_injects_read_in_one_turn_are_stored_by_one_batch() -> None:
    """Issue 12: every Inject read in one turn goes into one group-commit part (no task, no future); each
    gets its own Stored only once that part is committed, and a refused one does not hold the others back."""
    async with shard() as h:
        commits: list[Batch] = []
        commit_then = h.core.io.commit_then

        def counting(batch: Batch, done: Done, company: float = 0.0) -> None:
            commits.append(batch)
            commit_then(batch, done, company)

        h.core.io.commit_then = counting  # type: ignore[method-assign]
        for req, recipients in enumerate((["r@f.test"], [], ["s@f.test", "t@g.test"], ["u@f.test"]), start=1):
            await h.core.handle(FRONTEND, Inject(req, "a@sender.test", recipients, BODY))
        assert not h.peer.sent  # nothing is answered before the batch is committed
        await h.core.idle()
        (batch,) = commits
        assert len(batch.stores) == 3
        stored = {m.req: m.queue_id for m in h.peer.take(Stored, FRONTEND)}
        (refused,) = h.peer.take(InjectRefused, FRONTEND)
        assert sorted(stored) == [1, 3, 4] and refused.req == 2 and refused.code == 554
        assert len(set(stored.values())) == 3 and all(q in h.core.scheduler.messages for q in stored.values())
        assert sorted(h.spool.queue_ids()) == sorted(stored.values())
        # A batch that cannot be committed refuses each of its injects, and stores none of them.
        h.spool.fail_commits(1, disk_full=False)
        for req in (5, 6):
            await h.core.handle(FRONTEND, Inject(req, "a@sender.test", ["v@f.test"], BODY))
        await h.core.idle()
        refusals = h.peer.take(InjectRefused, FRONTEND)
        assert sorted((r.req, r.code, r.enhanced) for r in refusals) == [(5, 451, "4.3.0"), (6, 451, "4.3.0")]
        assert len(commits) == 2 and len(h.core.scheduler.messages) == 3


async def test_results_read_in_one_turn_are_recorded_in_one_ledger_pass() -> None:
    """Issue 12: the Results taken in during one turn are committed by one ledger pass (one task, one lock, one
    transaction), and every outcome still has its own log line and count."""
    async with shard() as h:
        queue_ids = [await h.inject("a@sender.test", [f"r{i}@d{i}.test"]) for i in range(3)]
        await h.heartbeat(free=10)
        jobs = await h.deliveries()
        assert len(jobs) == 3
        passes: list[list[str]] = []
        apply = h.core.ledger.apply

        async def counting(queue_ids: Any, *args: Any) -> Any:
            passes.append(list(queue_ids))
            return await apply(queue_ids, *args)

        h.core.ledger.apply = counting  # type: ignore[method-assign]
        commits: list[Batch] = []
        commit = h.core.io.commit

        async def kept(batch: Batch, company: float = 0.0) -> None:
            commits.append(batch)
            await commit(batch, company)

        h.core.io.commit = kept  # type: ignore[method-assign]
        before = h.core.io.transactions
        for job in jobs:
            outcomes = [Outcome(r, OutcomeKind.DELIVERED, 250, "2.0.0", "ok", "mx.test[192.0.2.1]")
                        for r in job.recipients]
            await h.core.handle(WORKER, Result(job.job_id, "w", outcomes))
        await h.core.idle()
        assert passes == [[job.queue_id for job in jobs]]
        assert h.core.io.transactions == before + 1
        # Every message is done: its rows are removed, and no recipient update is written for them first.
        (batch,) = commits
        assert sorted(batch.removals) == sorted(job.queue_id for job in jobs) and not batch.updates
        assert not h.spool.queue_ids() and not any(q in h.core.scheduler.messages for q in queue_ids)


async def test_disk_full_refuses_new_mail() -> None:
    async with shard(MemorySpool(free_bytes=10), min_free_space=1000) as h:
        await h.core.handle(FRONTEND, Inject(1, "a@sender.test", ["r@f.test"], BODY))
        await h.core.idle()
        (refused,) = h.peer.take(InjectRefused, FRONTEND)
        assert (refused.code, refused.enhanced) == (452, "4.3.1")
        h.spool.free_bytes = 10_000
        h.core.tick(10)
        assert await h.inject("a@sender.test", ["r@f.test"])


def lines_about(caplog: pytest.LogCaptureFixture, queue_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{queue_id}: ")]


async def test_one_log_line_per_outcome_grep_able_by_queue_id(caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="mtacluster.queue")
    monkeypatch.setattr(logs, "_structured", True)  # as with [log] format = "json": lines carry their fields
    async with shard(retry_first=300, retry_max=600, max_lifetime=3600) as h:
        queue_id = await h.inject("a@sender.test", ["x@a.test", "y@b.test", "z@c.test"])
        await h.heartbeat()
        jobs = {job.domain: job for job in await h.deliveries()}
        h.clock.advance(2.0)  # the worker took two seconds; it measured 0.5 s connecting and 1.25 s sending
        await h.result(jobs["a.test"], "delivered", 250, "2.0.0", "Ok: queued as 4F2A", "mx.a.test[192.0.2.7]",
                       port=25, connect=0.5, transfer=1.25)
        await h.result(jobs["b.test"], "failed", 550, "5.1.1", "no such user", "mx.b.test[192.0.2.8]", port=25)
        await h.result(jobs["c.test"], "deferred", 421, "4.4.2", "timeout", "")
        lines = lines_about(caplog, queue_id)
        assert lines[0] == f"{queue_id}: from=<a@sender.test>, size={len(BODY)}, nrcpt=3 (queue active)"
        assert lines[1] == (f"{queue_id}: to=<x@a.test>, relay=mx.a.test[192.0.2.7]:25, delay=2, "
                            "delays=0/0.25/0.5/1.25, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4F2A)")
        assert lines[2].startswith(f"{queue_id}: to=<y@b.test>, relay=mx.b.test[192.0.2.8]:25, delay=2, ")
        assert lines[2].endswith("dsn=5.1.1, status=bounced (550 5.1.1 no such user)")
        assert lines[3].startswith(f"{queue_id}: sender non-delivery notification: ")
        assert lines[4] == (f"{queue_id}: to=<z@c.test>, relay=none, delay=2, delays=0/2/0/0, dsn=4.4.2, "
                            "status=deferred (421 4.4.2 timeout)")
        h.clock.advance(3600)
        h.core.tick(0)
        await h.heartbeat()
        (again,) = [job for job in await h.deliveries() if job.domain == "c.test"]
        await h.result(again, "deferred", 421, "4.4.2", "timeout", "")
        expired, notification, removed = lines_about(caplog, queue_id)[-3:]
        assert expired == (f"{queue_id}: to=<z@c.test>, relay=none, delay=3602, delays=3602/0/0/0, dsn=4.4.7, "
                           "status=expired (421 4.4.7 delivery time expired; last error: 421 4.4.2 timeout)")
        assert notification.startswith(f"{queue_id}: sender non-delivery notification: ")
        assert removed == f"{queue_id}: removed"
        record = next(r for r in caplog.records if "status=sent" in r.getMessage())
        fields = record.__dict__["fields"]
        assert (fields["queue_id"], fields["to"], fields["status"], fields["dsn"], fields["delays"]) == (
            queue_id, "x@a.test", "sent", "2.0.0", [0.0, 0.25, 0.5, 1.25])
        sent = REGISTRY.get_sample_value("mtacluster_queue_outcomes_total", {"shard": "0", "status": "sent"})
        assert sent is not None and sent >= 1


class NotingStream:
    """A log stream that notes, with each write, what `look()` says at that moment."""

    def __init__(self, look: Callable[[], Any]) -> None:
        self.look = look
        self.writes: list[tuple[str, Any]] = []

    def write(self, text: str) -> int:
        self.writes.append((text, self.look()))
        return len(text)

    def flush(self) -> None:
        return None


async def test_outcome_lines_are_written_as_soon_as_the_outcome_is_durable() -> None:
    """The direct log lines (cluster/logs.py) are written when the outcome is durable, not at the end of the
    loop turn, so a kill -9 cannot lose the line of an outcome already committed: an arrival's line before
    the message is even scheduled (right after its Stored), the delivery's and the removal's before the
    commit's outcomes are counted."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    logs.configure("queue", "text")
    try:
        async with shard() as h:
            def sent() -> float:
                return REGISTRY.get_sample_value("mtacluster_queue_outcomes_total",
                                                 {"shard": "0", "status": "sent"}) or 0.0

            stream = NotingStream(lambda: (len(h.core.scheduler.messages), sent()))
            cast(logging.StreamHandler, root.handlers[0]).setStream(stream)  # type: ignore[type-arg]
            queue_id = await h.inject("a@sender.test", ["x@a.test"])
            await h.heartbeat()
            (job,) = await h.deliveries()
            counted = sent()
            await h.result(job, "delivered", 250, "2.0.0", "ok")
            assert sent() == counted + 1
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    (arrival,) = [seen for text, seen in stream.writes if f"{queue_id}: from=<a@sender.test>" in text]
    assert arrival[0] == 0  # written before the message was scheduled
    (delivery,) = [(text, seen) for text, seen in stream.writes if "status=sent" in text]
    assert f"{queue_id}: removed" in delivery[0] and delivery[1][1] == counted  # before it was counted


async def test_admin_actions_and_refusals_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtacluster.queue")
    async with shard(MemorySpool(free_bytes=10), min_free_space=1000) as h:
        await h.core.handle(FRONTEND, Inject(1, "a@sender.test", ["r@f.test", "s@f.test"], BODY))
        await h.core.idle()
        assert "NOQUEUE: reject: from=<a@sender.test> nrcpt=2: 452 4.3.1 Insufficient system storage" in [
            r.getMessage() for r in caplog.records]
        h.spool.free_bytes = 10_000
        h.core.tick(10)
        queue_id = await h.inject("a@sender.test", ["r@f.test"])
        await h.admin("hold", queue_id=queue_id)
        await h.admin("delete", queue_id=queue_id)
        assert lines_about(caplog, queue_id)[1:] == [
            f"{queue_id}: to=<r@f.test>, status=held (by the queue administrator)",
            f"{queue_id}: to=<r@f.test>, status=deleted (deleted by the queue administrator)",
            f"{queue_id}: removed"]


async def test_a_result_racing_a_delete_of_its_message_changes_nothing_but_its_deliveries_are_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtacluster.queue")
    async with shard() as h:
        queue_id = await h.inject("a@sender.test", ["r@g.test", "s@g.test"])
        await h.heartbeat()
        (job,) = await h.deliveries()
        h.spool.hold_commits()
        await h.core.handle(CLI, AdminRequest(1, "delete", {"queue_id": queue_id}))
        await until(h.spool.waiting.is_set)  # the delete is decided (its job forgotten) and being written
        outcomes = [Outcome(r, OutcomeKind.DELIVERED, 250, "2.0.0", "ok") for r in job.recipients]
        await h.core.handle(WORKER, Result(job.job_id, "w", outcomes))
        h.spool.release_commits()
        await h.core.idle()
        (reply,) = h.peer.take(AdminReply, CLI)
        assert reply.ok and reply.data == {"queue_id": queue_id, "deleted": 2}
        assert queue_id not in h.core.scheduler.messages and queue_id not in h.spool.queue_ids()
        assert not h.core.scheduler.jobs and h.core.scheduler.workers["w"].credits == 10
        # The worker did deliver them: one status=sent line each, besides the deletion's.
        lines = lines_about(caplog, queue_id)
        for address in ("r@g.test", "s@g.test"):
            about = sorted(line.rsplit("status=", 1)[1] for line in lines if f"to=<{address}>" in line
                           and "status=" in line)
            assert about == ["deleted (deleted by the queue administrator)", "sent (250 2.0.0 ok)"], lines
        await h.core.handle(WORKER, Result(job.job_id, "w", outcomes))  # a resend logs nothing again
        assert len(lines_about(caplog, queue_id)) == len(lines)


async def test_destination_held_off_is_shown_counted_and_survives_a_restart() -> None:
    """Issue 11: recipients waiting behind a held-off destination are listed as such (also by list --deferred),
    counted in a gauge, and the backoff is in the spool: a restart does not try the destination again."""
    spool, clock = MemorySpool(), VirtualClock()
    async with shard(spool, clock) as h:
        await deferred_messages(h, 3)  # three jobs deferred with no server answering: held off
        until_time = h.core.scheduler.backoff_until["later.test"]
        waiting = await h.inject("a@sender.test", ["w@later.test"])
        await h.core.idle()
        assert spool.backoffs == {"later.test": until_time}
        h.core.tick(0)
        assert REGISTRY.get_sample_value("mtacluster_queue_destinations_held_off", {"shard": "0"}) == 1
        assert REGISTRY.get_sample_value("mtacluster_queue_held_off_messages", {"shard": "0"}) == 1
        listed = (await h.admin("list", deferred_only=True)).data
        assert listed["total"] == 4
        (shown,) = [m for m in listed["messages"] if m["queue_id"] == waiting]
        assert shown["recipients"][0]["state"] == "ready" and shown["recipients"][0]["held_off_until"] == until_time
    async with shard(spool, clock) as h:
        assert h.core.scheduler.backoff_until == {"later.test": until_time}
        await h.heartbeat(free=10)
        assert await h.deliveries() == []  # still held off after the restart
        assert (await h.admin("flush", domain="later.test")).ok
        assert len(await h.deliveries()) == 4
        await until(lambda: not spool.backoffs)  # the end of the backoff is written too


async def test_a_delivery_reported_while_an_admin_delete_waits_is_committed_and_logged_first(
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11: a delivered recipient had no `status=sent` line. A Result taken in while the message is
    locked by an admin change (its transaction held here), with a delete of the message already waiting for
    the lock: the delete used to decide first, take the recipient the worker had delivered (in flight, its job
    over) as deleted, and the Result's change was then dropped without a line. The outcome goes first now."""
    caplog.set_level(logging.INFO, logger="mtacluster.queue")
    async with shard() as h:
        queue_id = await h.inject("a@sender.test", ["r@sent.test", "s@later.test"])
        await h.heartbeat()
        jobs = {job.domain: job for job in await h.deliveries()}
        await h.result(jobs["later.test"], "deferred", 451, "4.3.0", "not now")
        assert h.states(queue_id) == [State.IN_FLIGHT, State.DEFERRED]
        h.spool.hold_commits()
        await h.core.handle(CLI, AdminRequest(1, "hold", {"queue_id": queue_id}))
        await until(h.spool.waiting.is_set)  # the hold holds the message's lock while it is written
        await h.core.handle(CLI, AdminRequest(2, "delete", {"queue_id": queue_id}))
        await asyncio.sleep(0)  # the delete waits for the lock
        outcomes = [Outcome("r@sent.test", OutcomeKind.DELIVERED, 250, "2.0.0", "ok", "mx.sent.test[192.0.2.7]")]
        await h.core.handle(WORKER, Result(jobs["sent.test"].job_id, "w", outcomes))
        await asyncio.sleep(0)  # its outcome waits for the lock too, behind the delete
        h.spool.release_commits()
        await h.core.idle()
        held, deleted = sorted(h.peer.take(AdminReply, CLI), key=lambda r: r.req)
        assert held.ok and held.data["held"] == 1
        assert deleted.ok and deleted.data == {"queue_id": queue_id, "deleted": 1}  # s@later.test only
        lines = lines_about(caplog, queue_id)
        sent = [line for line in lines if "to=<r@sent.test>" in line]
        assert len(sent) == 1 and "status=sent (250 2.0.0 ok)" in sent[0], lines
        assert [line for line in lines if "to=<s@later.test>" in line][-1].endswith("status=deleted (deleted by the "
                                                                                     "queue administrator)")
        assert queue_id not in h.core.scheduler.messages and queue_id not in h.spool.queue_ids()


async def test_a_shard_takes_and_delivers_new_mail_while_its_queue_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart: the shard serves before its queue is read (shard.py reads it in the background, in chunks).
    New mail is stored and delivered at once, `queue list` is answered once the queue is read, and nothing
    is loaded twice (the reader reads the spool as it was when it was opened)."""
    monkeypatch.setattr("cluster.queue.core.LOAD_CHUNK", 3)
    spool = MemorySpool()
    spool.open()
    stored = [Message(f"01OLD{n:011d}", "old@sender.test", START - 60, [Recipient(0, f"r{n}@old.test")], 10)
              for n in range(7)]
    stored[4].recipients[0].state = State.IN_FLIGHT  # out at the last stop
    spool.commit(Batch(stores=stored, bodies={m.queue_id: BODY for m in stored}))
    spool.close()
    async with shard(spool, loaded=False) as h:
        assert h.core.queue_total == 7 and not h.core.scheduler.messages and not h.core.loaded.is_set()
        new = await h.inject("a@sender.test", ["x@new.test"])
        await h.heartbeat()
        (job,) = await h.deliveries()
        assert job.queue_id == new
        await h.core.handle(CLI, AdminRequest(1, "list", {}))
        await asyncio.sleep(0)
        assert not h.peer.take(AdminReply, CLI)  # waits for the whole queue
        await h.core.load_queue()
        await h.core.idle()
        (listed,) = h.peer.take(AdminReply, CLI)
        assert listed.ok and listed.data["total"] == 8
        assert sorted(m["queue_id"] for m in listed.data["messages"]) == sorted([new, *(m.queue_id for m in stored)])
        assert h.core.queue_loaded == 7 and len(h.core.scheduler.messages) == 8
        assert h.spool.recipients(stored[4].queue_id) == [("r4@old.test", "ready")]  # recovered, committed
        assert sorted(job.queue_id for job in await h.deliveries()) == sorted(m.queue_id for m in stored)


async def test_a_damaged_record_found_when_its_body_is_read_is_quarantined_not_delivered(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtacluster.queue")
    async with shard() as h:
        damaged = await h.inject("a@sender.test", ["x@d.test"])
        sound = await h.inject("a@sender.test", ["y@d.test"])
        h.spool.damage(damaged)
        await h.heartbeat()
        (job,) = await h.deliveries()
        assert job.queue_id == sound
        await h.core.idle()
        # Kept aside (the record is moved to quarantine, not deleted), forgotten here, and never delivered.
        assert h.spool.quarantined == {damaged: "checksum mismatch"}
        assert damaged not in h.core.scheduler.messages and h.core.quarantined == [damaged]
        assert [j.queue_id for j in h.core.scheduler.jobs.values()] == [sound]
        assert h.core.scheduler.workers["w"].credits == 9
        assert await h.deliveries() == []
        (line,) = [line for line in lines_about(caplog, damaged) if "damaged" in line]
        assert "checksum mismatch" in line and "not delivered" in line


async def test_stored_goes_out_from_the_fsync_completion_without_a_task_per_inject() -> None:
    """Accept latency (issue 12): the answers are sent right where the fsync's completion is handled, through the
    sender that never waits, all of them before any of those messages is scheduled, and no task is made per
    inject; nothing is answered before the fsync."""
    config = config_from_dict({"metrics": {"listen": ""}}, environ={})
    spool, peer = MemorySpool(), Peer()
    sent_now: list[tuple[bytes, BusMessage, int]] = []
    core = ShardCore(config, 0, spool, VirtualClock(), peer.send,
                     send_now=lambda identity, message: sent_now.append(
                         (identity, message, len(core.scheduler.messages))))
    await core.load()
    writer = asyncio.create_task(core.io.run_writer())
    try:
        spool.hold_commits()
        await core.handle(FRONTEND, Inject(1, "a@sender.test", ["r@d.test"], BODY))
        await until(spool.waiting.is_set)  # written, its fsync held
        for req in (2, 3, 4):  # these share the next transaction
            await core.handle(FRONTEND, Inject(req, "a@sender.test", ["r@d.test"], BODY))
        assert not core._tasks and not sent_now
        spool.release_commits()
        await until(lambda: len(sent_now) == 4)
        assert all(identity == FRONTEND and isinstance(stored, Stored) for identity, stored, _ in sent_now)
        assert [scheduled for _, _, scheduled in sent_now] == [0, 1, 1, 1]  # answered first, then scheduled
        await core.idle()
        assert all(stored.queue_id in core.scheduler.messages for _, stored, _ in sent_now)
        assert not peer.sent
    finally:
        spool.release_commits()
        await core.settle(5)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await core.close()


async def test_a_stopping_shard_answers_the_messages_being_stored() -> None:
    async with shard() as h:
        h.spool.hold_commits()
        await h.core.handle(FRONTEND, Inject(1, "a@sender.test", ["r@d.test"], BODY))
        await until(h.spool.waiting.is_set)
        settling = asyncio.create_task(h.core.settle(5))
        try:
            await asyncio.sleep(0)
            assert not settling.done()  # it waits for the fsync of the message being stored
        finally:
            h.spool.release_commits()
        await settling
        (stored,) = h.peer.take(Stored, FRONTEND)
        assert stored.req == 1
