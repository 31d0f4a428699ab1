"""Worker.run against a fake queue shard (a ROUTER socket in the test speaking the real bus schemas) and a real
smtp-sink as the smarthost: heartbeats announce credits, jobs are delivered, results come back, connections are
reused, a shard restart (new epoch) is noticed, and bad frames do not stop the worker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from cluster.bus.schemas import Deliver, Heartbeat, HeartbeatAck, Result, decode
from cluster.config import Config, config_from_dict
from cluster.delivery.mx import StaticMxResolver
from cluster.delivery.worker import Worker
from tests.support.harness import SmtpSink
from tests.support.shard import until
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

BODY = b"Received: from test\r\nSubject: worker test\r\nMessage-ID: <w1@test>\r\n\r\n.leading dot\r\nbody\r\n"


class FakeShard:
    """The shard side of the dispatch protocol, driven step by step by the test."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.epoch = "epoch-1"
        self.worker_identity: bytes | None = None

    async def receive(self, timeout: float = 10) -> Heartbeat | Result:
        identity, frame = await asyncio.wait_for(self.socket.recv_multipart(), timeout)
        self.worker_identity = identity
        message = decode(frame)
        assert isinstance(message, Heartbeat | Result), message
        return message

    async def next_of(self, kind: type, timeout: float = 10) -> Heartbeat | Result:
        """The next message of `kind`, answering heartbeats on the way."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive(timeout)
                if isinstance(message, Heartbeat):
                    await self.ack()
                if isinstance(message, kind):
                    return message

    async def ack(self, revoked: list[str] | None = None, resend: list[str] | None = None) -> None:
        assert self.worker_identity is not None
        ack = HeartbeatAck(shard=0, shard_epoch=self.epoch, revoked=revoked or [], resend=resend or [])
        await self.socket.send_multipart([self.worker_identity, ack.encode()])

    async def send(self, frame: bytes) -> None:
        assert self.worker_identity is not None
        await self.socket.send_multipart([self.worker_identity, frame])

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    sink = SmtpSink(host="127.0.0.1").start()
    yield sink
    sink.stop()


@pytest.fixture
def config(sink: SmtpSink) -> Config:
    return config_from_dict({
        "queue": {"shards": [f"tcp://127.0.0.1:{free_port()}"], "heartbeat_interval": 0.1, "worker_timeout": 2},
        "delivery": {"smarthost": sink.address, "concurrency": 3},
        "metrics": {"listen": ""},
    }, environ={})


@pytest.fixture
async def running(config: Config) -> AsyncIterator[tuple[Worker, FakeShard]]:
    shard = FakeShard(config.queue.shards[0])
    worker = Worker(config, name="worker-test", resolver=StaticMxResolver({}))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker, shard
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        shard.close()


def job(job_id: str, *recipients: str) -> Deliver:
    return Deliver(job_id=job_id, queue_id="Q" + job_id, sender="sender@origin.test", recipients=list(recipients),
                   domain="dest.test", body=BODY, attempt=1)


async def test_heartbeat_announces_credits_and_readiness(running: tuple[Worker, FakeShard]) -> None:
    worker, shard = running
    first = await shard.next_of(Heartbeat)
    assert isinstance(first, Heartbeat)
    assert (first.worker, first.free, first.in_flight) == ("worker-test", 3, [])
    await shard.next_of(Heartbeat)  # answered: the worker has now heard an ack
    await until(worker.is_ready, 5, "the worker to be ready")


async def test_jobs_are_delivered_and_results_returned(running: tuple[Worker, FakeShard], sink: SmtpSink) -> None:
    worker, shard = running
    await shard.next_of(Heartbeat)
    await shard.send(job("j1", "a@dest.test", "b@dest.test").encode())
    result = await shard.next_of(Result)
    assert isinstance(result, Result)
    assert result.job_id == "j1" and result.worker == "worker-test"
    assert [(o.recipient, o.kind, o.code) for o in result.outcomes] == [
        ("a@dest.test", "delivered", 250), ("b@dest.test", "delivered", 250)], result.outcomes
    await shard.send(job("j2", "c@dest.test").encode())
    result = await shard.next_of(Result)
    assert isinstance(result, Result) and result.outcomes[0].kind == "delivered"
    messages = await asyncio.to_thread(sink.wait_for_messages, 2)
    assert sorted(r for m in messages for r in m.recipients) == ["a@dest.test", "b@dest.test", "c@dest.test"]
    # Byte-identical body (the sink dumps LF line ends) with the leading dot un-stuffed again.
    for message in messages:
        assert "Received: from test\nSubject: worker test\n" in message.text
        assert message.without_trace_headers() == "Subject: worker test\nMessage-ID: <w1@test>\n\n.leading dot\nbody\n"
    # Both jobs went over one cached connection.
    assert worker.deliverer.connections_opened == 1


async def test_twenty_jobs_at_once_reuse_connections_and_each_is_delivered_once(
        running: tuple[Worker, FakeShard], sink: SmtpSink) -> None:
    worker, shard = running
    await shard.next_of(Heartbeat)
    for number in range(20):
        await shard.send(job(f"j{number}", f"r{number}@dest.test").encode())
    results: dict[str, Result] = {}
    while len(results) < 20:
        result = await shard.next_of(Result)
        assert isinstance(result, Result) and result.job_id not in results, result
        results[result.job_id] = result
    assert all(r.outcomes[0].kind == "delivered" for r in results.values()), results
    messages = await asyncio.to_thread(sink.wait_for_messages, 20)
    assert sorted(r for m in messages for r in m.recipients) == sorted(f"r{n}@dest.test" for n in range(20))
    # At most `delivery.concurrency` (3) deliveries run at once, each on a connection taken from the cache
    # when one is idle: far fewer connections than messages.
    assert 1 <= worker.deliverer.connections_opened <= 3


async def test_in_flight_jobs_are_listed_in_heartbeats(config: Config, tmp_path: Path) -> None:
    # A smarthost that accepts the connection but never greets: the job stays in flight.
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    slow = config_from_dict({
        "queue": {"shards": list(config.queue.shards), "heartbeat_interval": 0.1, "worker_timeout": 2},
        "delivery": {"smarthost": f"127.0.0.1:{port}", "concurrency": 3, "greeting_timeout": 30},
        "metrics": {"listen": ""},
    }, environ={})
    shard = FakeShard(slow.queue.shards[0])
    worker = Worker(slow, name="w-slow", resolver=StaticMxResolver({}))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await shard.next_of(Heartbeat)
        await shard.send(job("slow1", "x@dest.test").encode())
        async with asyncio.timeout(5):
            while True:
                beat = await shard.next_of(Heartbeat)
                assert isinstance(beat, Heartbeat)
                if beat.in_flight == ["slow1"]:
                    assert beat.free == 2
                    break
        assert REGISTRY.get_sample_value("mtacluster_delivery_jobs_in_flight") == 1  # read when scraped
    finally:
        stop.set()
        # The stuck job is abandoned within the shutdown grace period.
        await asyncio.wait_for(task, 15)
        held_after_stop = REGISTRY.get_sample_value("mtacluster_delivery_jobs_in_flight")
        shard.close()
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
    assert held_after_stop == 0


async def test_shard_restart_is_noticed_and_bad_frames_ignored(running: tuple[Worker, FakeShard]) -> None:
    _, shard = running
    await shard.next_of(Heartbeat)
    await shard.send(b"\xc1 not msgpack")
    await shard.send(HeartbeatAck(shard=0, shard_epoch="x").encode()[:5])
    shard.epoch = "epoch-2"
    await shard.ack()
    # Re-announced at once (not only at the next interval), and still working afterwards.
    beat = await shard.next_of(Heartbeat)
    assert isinstance(beat, Heartbeat) and beat.free == 3
    await shard.send(job("j3", "d@dest.test").encode())
    result = await shard.next_of(Result)
    assert isinstance(result, Result) and result.outcomes[0].kind == "delivered"


@dataclass
class HeldSmarthost:
    """A smarthost that holds each session in its greeting until `release` is set, then answers 421."""
    port: int
    release: asyncio.Event
    held: list[asyncio.StreamWriter]

    def worker_config(self, config: Config, concurrency: int) -> Config:
        """`config`'s shards, quick heartbeats, and delivery through this smarthost with `concurrency` jobs."""
        return config_from_dict({
            "queue": {"shards": list(config.queue.shards), "heartbeat_interval": 0.1, "worker_timeout": 2},
            "delivery": {"smarthost": f"127.0.0.1:{self.port}", "concurrency": concurrency},
            "metrics": {"listen": ""},
        }, environ={})


@contextlib.asynccontextmanager
async def held_smarthost() -> AsyncIterator[HeldSmarthost]:
    release = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def slow_greeting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await release.wait()
        writer.write(b"421 4.3.2 not today\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow_greeting, "127.0.0.1", 0)
    try:
        yield HeldSmarthost(server.sockets[0].getsockname()[1], release, held)
    finally:
        release.set()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_result_kept_while_the_shard_is_away_and_sent_again_when_asked(config: Config) -> None:
    # The smarthost holds the job in its greeting until the shard has gone away.
    async with held_smarthost() as smarthost:
        release, held = smarthost.release, smarthost.held
        away = smarthost.worker_config(config, 3)
        shard = FakeShard(away.queue.shards[0])
        worker = Worker(away, name="w-away", resolver=StaticMxResolver({}))
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            await shard.next_of(Heartbeat)
            await shard.send(job("kept", "x@dest.test").encode())
            await until(lambda: held, 5, "the smarthost to hold a session")
            shard.close()
            release.set()
            await until(lambda: "kept" in worker._links[0].session.results, 5, "the Result of kept")
            # The same shard instance is back (a network cut, not a restart): the worker lists the finished job,
            # the shard never got its Result and asks for it again.
            shard = FakeShard(away.queue.shards[0])
            beat = await shard.receive()
            assert isinstance(beat, Heartbeat) and beat.finished == ["kept"] and beat.in_flight == []
            await shard.ack(resend=["kept"])
            result = await shard.receive()
            assert isinstance(result, Result) and result.job_id == "kept"
            assert (result.outcomes[0].kind, result.outcomes[0].code) == ("deferred", 421)
            beat = await shard.receive()
            assert isinstance(beat, Heartbeat) and beat.finished == ["kept"]
            await shard.ack(revoked=["kept"])  # recorded: the worker forgets it
            beat = await shard.receive()
            assert isinstance(beat, Heartbeat) and beat.finished == [] and beat.in_flight == [] and beat.free == 3
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            shard.close()


async def test_stop_hands_back_jobs_not_started_and_finishes_the_running_one(config: Config) -> None:
    async with held_smarthost() as smarthost:
        release, held = smarthost.release, smarthost.held
        one_at_a_time = smarthost.worker_config(config, 1)
        shard = FakeShard(one_at_a_time.queue.shards[0])
        worker = Worker(one_at_a_time, name="w-stop", resolver=StaticMxResolver({}))
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            await shard.next_of(Heartbeat)
            await shard.send(job("running", "x@dest.test").encode())
            await shard.send(job("waiting", "y@dest.test").encode())
            await until(lambda: held, 5, "the smarthost to hold a session")
            stop.set()  # SIGTERM: "waiting" never started, so it is handed back at once
            async with asyncio.timeout(5):
                while True:
                    beat = await shard.receive()
                    if isinstance(beat, Heartbeat) and "waiting" not in beat.in_flight:
                        break
            assert beat.in_flight == ["running"]
            release.set()
            result = await shard.receive()
            assert isinstance(result, Result) and result.job_id == "running"
            await asyncio.wait_for(task, 15)
            assert len(held) == 1  # the handed-back job never reached the smarthost
        finally:
            stop.set()
            release.set()
            if not task.done():
                await asyncio.wait_for(task, 15)
            shard.close()


async def test_a_worker_cut_off_from_its_shard_starts_nothing_until_told_which_jobs_are_still_its_own(
        running: tuple[Worker, FakeShard], sink: SmtpSink) -> None:
    """Fencing: no ack for half of worker_timeout (1 s here) means the shard may have handed our jobs to
    another worker; jobs received meanwhile wait, and the next ack revokes those that are no longer ours."""
    worker, shard = running
    await shard.next_of(Heartbeat)  # acked once, then the shard goes quiet (acks lost in a cut)
    session = worker._links[0].session
    await until(lambda: session.last_ack != float("-inf") and session.fenced(time.monotonic()), 5,
                "the link acked once and then fenced")
    await shard.send(job("theirs", "a@dest.test").encode())
    await shard.send(job("mine", "b@dest.test").encode())
    async with asyncio.timeout(5):
        while True:  # heartbeats go unanswered; both jobs are listed and neither starts
            beat = await shard.receive()
            if isinstance(beat, Heartbeat) and sorted(beat.in_flight) == ["mine", "theirs"]:
                break
    assert session.waiting.keys() == {"mine", "theirs"} and not sink.messages()
    await shard.ack(revoked=["theirs"])  # the link is back: "theirs" went to another worker meanwhile
    result = await shard.next_of(Result)
    assert isinstance(result, Result) and result.job_id == "mine"
    assert [r for m in sink.messages() for r in m.recipients] == ["b@dest.test"]


async def test_a_failure_in_the_link_loop_is_logged_and_the_link_goes_on(
        running: tuple[Worker, FakeShard], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    worker, shard = running
    real = Worker._on_message
    failures = [RuntimeError("a bug in handling a frame")]

    async def failing_once(self: Worker, link: object, message: object) -> None:
        if failures:
            raise failures.pop()
        await real(self, link, message)  # type: ignore[arg-type]

    monkeypatch.setattr(Worker, "_on_message", failing_once)
    await shard.next_of(Heartbeat)
    await shard.ack()  # handled by the failing handler
    await shard.next_of(Heartbeat)  # the loop went on: it still heartbeats, and acks are handled again
    await until(worker.is_ready, 5, "the worker to be ready")
    assert "the link's loop failed" in caplog.text and not failures


async def test_jobs_beyond_concurrency_wait_in_order_and_a_revoked_waiting_job_never_runs(config: Config) -> None:
    """One runner (concurrency 1): the later jobs wait in the link's queue; the shard revokes the second while
    it waits, so only the first, third and fourth reach the smarthost, in that order, and no more runners are
    made than `delivery.concurrency`."""
    async with held_smarthost() as smarthost:
        one_at_a_time = smarthost.worker_config(config, 1)
        shard = FakeShard(one_at_a_time.queue.shards[0])
        worker = Worker(one_at_a_time, name="w-queue", resolver=StaticMxResolver({}))
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            await shard.next_of(Heartbeat)
            for job_id in ("first", "second", "third", "fourth"):
                await shard.send(job(job_id, f"{job_id}@dest.test").encode())
            await until(lambda: smarthost.held, 5, "the smarthost to hold a session")
            link = worker._links[0]
            assert [entry[0].job_id for entry in link.queue] == ["second", "third", "fourth"]
            assert len(link.runners) == 1
            await shard.ack(revoked=["second"])
            await until(lambda: "second" not in link.session.waiting, 5, "the revoked job to leave the queue")
            smarthost.release.set()  # each session is answered 421: the jobs end deferred, one after the other
            results = [await shard.next_of(Result) for _ in range(3)]
            assert [r.job_id for r in results if isinstance(r, Result)] == ["first", "third", "fourth"]
            assert len(smarthost.held) == 3 and len(link.runners) == 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            shard.close()


async def test_a_job_whose_run_fails_outside_the_delivery_is_handed_back_and_the_runner_goes_on(
        running: tuple[Worker, FakeShard], sink: SmtpSink, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    worker, shard = running
    real = Worker._outcomes
    failures = [RuntimeError("a bug outside the delivery")]

    async def failing_once(self: Worker, deliver: Deliver) -> list[object]:
        if failures:
            raise failures.pop()
        return await real(self, deliver)  # type: ignore[return-value]

    monkeypatch.setattr(Worker, "_outcomes", failing_once)
    await shard.next_of(Heartbeat)
    await shard.send(job("broken", "a@dest.test").encode())
    async with asyncio.timeout(5):  # no longer ours: left out of the heartbeats, so the shard hands it out again
        while True:
            beat = await shard.next_of(Heartbeat)
            if isinstance(beat, Heartbeat) and not beat.in_flight and not failures:
                break
    assert "queue_id=Qbroken job=broken: running the job failed" in caplog.text
    await shard.send(job("next", "b@dest.test").encode())
    result = await shard.next_of(Result)
    assert isinstance(result, Result) and result.job_id == "next" and result.outcomes[0].kind == "delivered"
    assert beat.finished == [] and len(worker._links[0].runners) == 1
