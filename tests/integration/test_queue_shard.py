"""A queue shard in this process, driven over real ZeroMQ sockets by a fake frontend and a fake worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgpack
import pytest
from prometheus_client import REGISTRY

from cluster.bus.schemas import (
    AdminReply,
    AdminRequest,
    Deliver,
    Error,
    Heartbeat,
    HeartbeatAck,
    InjectRefused,
    Outcome,
    OutcomeKind,
    Result,
    Stored,
)
from cluster.queue.records import LastOutcome, State
from tests.support.shard import BODY, RunningShard, inject, shard_config, until

pytestmark = pytest.mark.integration


async def test_inject_deliver_result_cycle(running_shard: RunningShard) -> None:
    frontend, worker = running_shard.client(), running_shard.client()
    stored = await inject(frontend, 1, "a@sender.test", ["x@a.test", "y@A.test", "z@b.test"], BODY)
    assert isinstance(stored, Stored) and len(stored.queue_id) == 16
    await worker.send(Heartbeat("w1", 10, []))
    ack = await worker.recv_type(HeartbeatAck)
    assert ack.shard == 0 and ack.shard_epoch == running_shard.shard.epoch
    jobs = [await worker.recv_type(Deliver), await worker.recv_type(Deliver)]
    by_domain = {job.domain: job for job in jobs}
    assert set(by_domain) == {"a.test", "b.test"}
    assert sorted(by_domain["a.test"].recipients) == ["x@a.test", "y@A.test"]
    assert by_domain["a.test"].body == BODY and by_domain["a.test"].attempt == 1
    assert by_domain["a.test"].queue_id == stored.queue_id and by_domain["a.test"].sender == "a@sender.test"

    sent = time.time()
    await worker.send(Result(by_domain["a.test"].job_id, "w1", [
        Outcome("x@a.test", "delivered", 250, "2.0.0", "ok", "mx.a.test[192.0.2.7]"),
        Outcome("y@A.test", "failed", 550, "5.1.1", "no such user", "mx.a.test[192.0.2.7]")]))
    await worker.send(Result(by_domain["b.test"].job_id, "w1", [
        Outcome("z@b.test", "deferred", 421, "4.4.2", "try later", "")]))
    message = running_shard.shard.scheduler.messages[stored.queue_id]
    await until(lambda: [r.state for r in message.recipients] == [State.DELIVERED, State.FAILED, State.DEFERRED],
                what="the outcomes applied")
    applied = time.time()
    deferred = message.recipients[2]
    assert deferred.attempts == 1 and deferred.last == LastOutcome(OutcomeKind.DEFERRED, 421, "4.4.2", "try later")
    # retry_first=30 with +-10 % jitter, counted from the moment the outcome was applied: between `sent` and
    # `applied` (bounds taken around it, not from "now", so a slow machine cannot push it out of range).
    assert sent + 27 <= deferred.next_attempt <= applied + 33
    # The failure of y@A.test makes a DSN from <> to the sender, whose domain this (only) shard owns.
    dsn = await worker.recv_type(Deliver)
    assert (dsn.sender, dsn.recipients, dsn.domain) == ("", ["a@sender.test"], "sender.test")
    assert b"Final-Recipient: rfc822; y@A.test" in dsn.body and b"Status: 5.1.1" in dsn.body
    assert running_shard.shard.scheduler.workers["w1"].credits == 9
    assert list(running_shard.shard.scheduler.jobs) == [dsn.job_id]
    # The gauges are set on the shard's timer tick: one tick may have run between the two Results (in_flight
    # already 1, deferred still 0), and gauges of shard "0" outlive earlier tests in this process. So wait for
    # the whole expected picture at once, not for one gauge and then read the others.
    expected = {("recipients", "in_flight"): 1.0, ("recipients", "deferred"): 1.0,
                ("messages", "in_flight"): 1.0, ("messages", "deferred"): 1.0, ("workers_connected", ""): 1.0}
    gauges: dict[tuple[str, str], float | None] = {}

    def gauges_refreshed() -> bool:
        for name, state in expected:
            labels = {"shard": "0", "state": state} if state else {"shard": "0"}
            gauges[name, state] = REGISTRY.get_sample_value(f"mtacluster_queue_{name}", labels)
        return gauges == expected

    try:
        await until(gauges_refreshed, what="gauges refreshed")
    except AssertionError as timeout:
        raise AssertionError(f"gauges {gauges} never became {expected}") from timeout
    assert sample("mtacluster_queue_recipients_completed_total", outcome="delivered") >= 1
    assert sample("mtacluster_queue_bounces_generated_total", kind="failed") >= 1
    assert sample("mtacluster_queue_spool_commit_batch_messages_count") >= 2


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, {"shard": "0", **labels})
    assert value is not None, f"no sample {name} {labels}"
    return value


async def test_bad_frames_get_an_error(running_shard: RunningShard) -> None:
    client = running_shard.client()
    bad_outcome = msgpack.packb({"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {"recipient": 5, "status": "delivered", "code": "x", "enhanced": "", "text": ""}]})
    bad_heartbeat = msgpack.packb({"t": "heartbeat", "worker": "w", "free": 1, "in_flight": [1, None]})
    for frame in (b"\xc1garbage", b"\x93\x01\x02\x03", Stored(1, "x").encode(), bad_outcome, bad_heartbeat):
        await client.send_raw(frame)
        assert isinstance(await client.recv(), Error)
    assert running_shard.shard.is_ready()
    refused = await inject(client, 7, "a@sender.test", [], BODY)
    assert isinstance(refused, InjectRefused) and refused.code == 554


async def test_a_message_of_several_frames_is_read_whole_and_answered_by_its_last(
        running_shard: RunningShard) -> None:
    """The shard reads a message frame by frame (each frame says whether another follows): the payload is the
    last frame, whatever comes before it, and the next message starts clean."""
    client = running_shard.client()
    ping = AdminRequest(req=3, op="ping").encode()
    await client.socket.send_multipart([b"first", b"second", ping])
    answer = await client.recv()
    assert isinstance(answer, AdminReply) and answer.req == 3 and answer.ok
    await client.socket.send_multipart([b"\xc1not a frame", AdminRequest(req=4, op="ping").encode()])
    answer = await client.recv()
    assert isinstance(answer, AdminReply) and answer.req == 4
    await client.send_raw(AdminRequest(req=5, op="ping").encode())
    answer = await client.recv()
    assert isinstance(answer, AdminReply) and answer.req == 5


async def test_job_missing_from_heartbeat_goes_back_to_ready(running_shard: RunningShard) -> None:
    frontend, worker = running_shard.client(), running_shard.client()
    stored = await inject(frontend, 1, "s@sender.test", ["r@c.test"], BODY)
    await worker.send(Heartbeat("w2", 1, []))
    ack = await worker.recv_type(HeartbeatAck)
    first = await worker.recv_type(Deliver)
    # A heartbeat that has not seen the Deliver yet (it crossed it on the wire) takes nothing back...
    await worker.send(Heartbeat("w2", 1, [], seen=first.seq - 1, seen_epoch=ack.shard_epoch,
                                incarnation=ack.incarnation))
    await worker.recv_type(HeartbeatAck)
    assert running_shard.shard.scheduler.messages[stored.queue_id].recipients[0].state is State.IN_FLIGHT
    # ...one that has seen it but does not list the job says the job was lost: it goes back to ready.
    await worker.send(Heartbeat("w2", 1, [], seen=first.seq, seen_epoch=ack.shard_epoch, incarnation=ack.incarnation))
    await worker.recv_type(HeartbeatAck)
    # The job is ready again and, the credit being returned with it, delivered again.
    again = await worker.recv_type(Deliver)
    assert again.queue_id == stored.queue_id and again.job_id != first.job_id
    assert running_shard.shard.scheduler.messages[stored.queue_id].recipients[0].state is State.IN_FLIGHT


async def test_silent_worker_loses_its_jobs(running_shard: RunningShard) -> None:
    frontend, worker, other = running_shard.client(), running_shard.client(), running_shard.client()
    stored = await inject(frontend, 1, "s@sender.test", ["r@d.test"], BODY)
    await worker.send(Heartbeat("silent", 1, []))
    await worker.recv_type(Deliver)
    await other.send(Heartbeat("other", 1, []))
    await other.recv_type(HeartbeatAck)
    started = time.monotonic()
    # "other" keeps beating; "silent" does not, and after worker_timeout (1 s) its job goes to "other".
    while True:
        await other.send(Heartbeat("other", 1, []))
        message = await other.recv()
        if isinstance(message, Deliver):
            break
        assert time.monotonic() - started < 10, "the job never came back"
        await asyncio.sleep(0.1)
    assert message.queue_id == stored.queue_id
    assert time.monotonic() - started >= 0.8
    assert "silent" not in running_shard.shard.scheduler.workers


async def test_disk_full_refuses_new_mail(tmp_path: Path) -> None:
    shard = await RunningShard(shard_config(tmp_path / "spool", min_free_space="1000000GiB")).start()
    try:
        client = shard.client()
        refused = await inject(client, 3, "a@sender.test", ["b@e.test"], BODY)
        assert isinstance(refused, InjectRefused)
        assert (refused.code, refused.enhanced, refused.text) == (452, "4.3.1", "Insufficient system storage")
        assert not shard.shard.scheduler.messages
    finally:
        await shard.close()


async def test_messages_survive_a_clean_restart(tmp_path: Path) -> None:
    config = shard_config(tmp_path / "spool")
    first = await RunningShard(config).start()
    frontend, worker = first.client(), first.client()
    stored = await inject(frontend, 1, "a@sender.test", ["r1@f.test", "r2@g.test"], BODY)
    await worker.send(Heartbeat("w", 1, []))
    await worker.recv_type(Deliver)  # one recipient in flight at the stop
    await first.close()
    second = await RunningShard(config).start()
    try:
        message = second.shard.scheduler.messages[stored.queue_id]
        assert {r.state for r in message.recipients} == {State.READY}
        worker = second.client()
        await worker.send(Heartbeat("w", 5, []))
        jobs = [await worker.recv_type(Deliver), await worker.recv_type(Deliver)]
        assert {job.domain for job in jobs} == {"f.test", "g.test"}
    finally:
        await second.close()


async def test_a_failing_handler_answers_error_and_the_shard_keeps_serving(running_shard: RunningShard,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(identity: bytes, heartbeat: Heartbeat, now: float) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(running_shard.shard.core.workers, "on_heartbeat", broken)
    client = running_shard.client()
    await client.send(Heartbeat("w", 1, []))
    error = await client.recv()
    assert isinstance(error, Error) and "heartbeat" in error.text
    assert isinstance(await inject(client, 5, "a@sender.test", ["r@m.test"], BODY), Stored)
