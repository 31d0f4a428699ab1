"""The bus client (cluster/bus/client.py) against real ROUTER sockets: matching by req, timeouts, an unreachable
shard, reconnection after the shard restarts, CURVE, one-way traffic, and ZMTP liveness against a paused peer."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from cluster.bus.client import BusLink, NoAnswer, ask_all
from cluster.bus.schemas import AdminReply, AdminRequest, BusMessage, Error, HeartbeatAck, Stored, decode
from cluster.bus.security import generate_key_file, secure_server, start_authenticator
from tests.support.tooling import free_port

Answer = Callable[[AdminRequest], list[BusMessage]]


def echo(request: AdminRequest) -> list[BusMessage]:
    return [AdminReply(req=request.req, ok=True, data={"op": request.op})]


class Router:
    """A shard's ROUTER socket in this process; `answer` decides the frames sent back for each request."""

    def __init__(self, endpoint: str, answer: Answer = echo, context: zmq.asyncio.Context | None = None) -> None:
        self.context = context or zmq.asyncio.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = endpoint
        self.answer = answer
        self.received: list[AdminRequest] = []
        self.identity: bytes | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Router:
        self.socket.bind(self.endpoint)
        self.task = asyncio.create_task(self._serve())
        return self

    async def _serve(self) -> None:
        while True:
            identity, frame = await self.socket.recv_multipart()
            self.identity = identity
            request = decode(frame)
            assert isinstance(request, AdminRequest)
            self.received.append(request)
            for reply in self.answer(request):
                await self.socket.send_multipart([identity, reply.encode()])

    async def send(self, frame: bytes) -> None:
        assert self.identity is not None
        await self.socket.send_multipart([self.identity, frame])

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.socket.close(linger=0)


def ping(op: str = "ping") -> Callable[[int], AdminRequest]:
    return lambda req: AdminRequest(req=req, op=op)


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(params=[False, True], ids=["asyncio", "direct"])
async def link(endpoint: str, request: pytest.FixtureRequest) -> AsyncIterator[BusLink]:
    """A started link, through pyzmq's asyncio layer or in direct mode (the frontend's and the worker's links):
    every request test runs on both."""
    link = BusLink(endpoint, None, name="shard 0", direct=request.param)
    link.start()
    yield link
    await link.close()


async def test_answers_are_matched_by_req_whatever_their_order(endpoint: str, link: BusLink) -> None:
    held: list[AdminRequest] = []

    def answer_in_reverse(request: AdminRequest) -> list[BusMessage]:
        held.append(request)
        if len(held) < 2:
            return []
        return [AdminReply(req=r.req, ok=True, data={"op": r.op}) for r in reversed(held)]

    router = Router(endpoint, answer_in_reverse).start()
    try:
        first, second = await asyncio.gather(link.request(ping("first"), 5), link.request(ping("second"), 5))
        assert isinstance(first, AdminReply) and first.data == {"op": "first"}
        assert isinstance(second, AdminReply) and second.data == {"op": "second"}
        assert link.heard_within(5)
    finally:
        await router.stop()


async def test_a_silent_shard_times_out_and_its_late_answer_is_dropped(endpoint: str, link: BusLink) -> None:
    router = Router(endpoint, lambda request: [] if request.op == "slow" else echo(request)).start()
    try:
        started = time.monotonic()
        with pytest.raises(NoAnswer) as missing:
            await link.request(ping("slow"), 0.3)
        assert 0.3 <= time.monotonic() - started < 2
        assert missing.value.sent and "did not answer within 0.3s" in str(missing.value)
        # The answer to the request that gave up arrives now: it must not be taken for the next one's.
        await router.send(AdminReply(req=router.received[0].req, ok=True, data={"op": "slow"}).encode())
        answer = await link.request(ping("next"), 5)
        assert isinstance(answer, AdminReply) and answer.data == {"op": "next"}
    finally:
        await router.stop()


async def test_an_unreachable_shard_is_reported_as_such(link: BusLink) -> None:
    with pytest.raises(NoAnswer) as missing:
        await link.request(ping(), 0.3)
    assert not missing.value.sent
    assert str(missing.value) == f"shard 0 ({link.endpoint}) is unreachable (no connection within 0.3s)"
    assert not await link.send(AdminRequest(req=1, op="x"))  # nothing is queued for an absent shard
    assert not link.heard_within(60)
    started = time.monotonic()
    with pytest.raises(NoAnswer) as early:
        await link.request(ping(), 30, connect_timeout=0.2)
    assert time.monotonic() - started < 5 and not early.value.sent and "no connection within 0.2s" in str(early.value)


async def test_concurrent_requests_to_an_unreachable_shard_each_give_up_in_time(link: BusLink) -> None:
    """pyzmq's asyncio layer queues a send behind one that waits for the connection (NOBLOCK or not): every
    request must still end after its own bounds, not wait as long as the shard is away."""
    started = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(link.request(ping(), 0.3) for _ in range(3)),
                                                    return_exceptions=True), 10)
    assert all(isinstance(result, NoAnswer) and not result.sent for result in results), results
    assert time.monotonic() - started < 5


class CountingSends:
    """Stands in for a direct link's plain socket: counts the send attempts (each one a wakeup spent on them)."""

    def __init__(self, inner: zmq.Socket[bytes]) -> None:
        self.inner = inner
        self.attempts = 0

    def send(self, frame: bytes, flags: int = 0, copy: bool = True) -> None:
        self.attempts += 1
        self.inner.send(frame, flags, copy=copy)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_waiting_for_an_absent_shard_costs_the_same_however_many_requests_wait(endpoint: str) -> None:
    """A shard outage: 300 injects waiting for the shard once made 300 send attempts every 10 ms (0.4 of a core);
    the link now retries its waiting frames on one timer, so the attempts do not grow with the waiting requests."""
    link = BusLink(endpoint, None, name="shard 0", direct=True)
    counting = CountingSends(link._plain)
    link._plain = counting  # type: ignore[assignment]
    link.start()
    try:
        outcomes = await asyncio.gather(*(link.request(ping(), 0.3) for _ in range(300)), return_exceptions=True)
        assert all(isinstance(o, NoAnswer) and not o.sent for o in outcomes), outcomes[:3]
        # About one attempt per 10 ms for the whole link (0.3 s: ~31), where each request retrying alone made ~9000.
        assert 1 <= counting.attempts < 100, counting.attempts
        assert link._unsent == {}  # nothing left to send once the shard comes back
    finally:
        await link.close()


async def test_a_request_that_gave_up_is_not_sent_when_the_shard_appears(endpoint: str) -> None:
    """Requests waiting for an absent shard: the one whose own timeout passed is never sent; the others reach
    the shard in the order they were made."""
    link = BusLink(endpoint, None, name="shard 0", direct=True)
    link.start()
    router: Router | None = None
    try:
        patient = [asyncio.create_task(link.request(ping(f"patient {n}"), 10)) for n in range(3)]
        await asyncio.sleep(0)  # they wait first, the hasty one behind them
        with pytest.raises(NoAnswer) as hasty:
            await link.request(ping("hasty"), 0.2)
        assert not hasty.value.sent
        patient.append(asyncio.create_task(link.request(ping("patient 3"), 10)))
        await asyncio.sleep(0)  # the last request joins the waiting frames
        router = Router(endpoint).start()
        answers = await asyncio.wait_for(asyncio.gather(*patient), 10)
        assert [a.data for a in answers if isinstance(a, AdminReply)] == [{"op": f"patient {n}"} for n in range(4)]
        assert [r.op for r in router.received] == [f"patient {n}" for n in range(4)]  # in order, no "hasty"
    finally:
        await link.close()
        if router is not None:
            await router.stop()


async def request_until_answered(link: BusLink, deadline: float) -> BusMessage:
    while True:
        try:
            return await link.request(ping(), 0.5)
        except NoAnswer:
            assert time.monotonic() < deadline, "no answer from the restarted shard"


async def test_reconnects_after_the_shard_restarts(endpoint: str, link: BusLink) -> None:
    first = Router(endpoint, lambda r: [AdminReply(req=r.req, ok=True, data="first")]).start()
    assert (await link.request(ping(), 5)) == AdminReply(req=1, ok=True, data="first")
    await first.stop()
    with pytest.raises(NoAnswer):
        await link.request(ping(), 0.3)
    second = Router(endpoint, lambda r: [AdminReply(req=r.req, ok=True, data="second")]).start()
    try:
        answer = await request_until_answered(link, time.monotonic() + 10)
        assert isinstance(answer, AdminReply) and answer.data == "second"
        # The restarted shard got only requests sent after it was up: nothing queued while it was away.
        assert all(r.req > 2 for r in second.received)
    finally:
        await second.stop()


async def test_an_error_naming_the_request_ends_the_wait(endpoint: str, link: BusLink) -> None:
    router = Router(endpoint, lambda r: [Error(text="bad frame: no", req=r.req)]).start()
    try:
        started = time.monotonic()
        answer = await link.request(ping(), 5)
        assert answer == Error(text="bad frame: no", req=1) and time.monotonic() - started < 2
    finally:
        await router.stop()


async def test_other_traffic_goes_to_the_handler_and_garbage_is_dropped(endpoint: str) -> None:
    router = Router(endpoint).start()
    link = BusLink(endpoint, None, name="shard 0")
    seen: list[BusMessage] = []

    async def on_message(message: BusMessage) -> None:
        seen.append(message)
        raise RuntimeError("a handler bug")  # logged; later frames and answers still arrive

    link.start(on_message)
    try:
        await link.request(ping(), 5)
        for frame in (b"\xc1 not msgpack", Error(text="unsolicited").encode(), HeartbeatAck(0, "e1").encode(),
                      Stored(req=99, queue_id="late").encode()):
            await router.send(frame)
        deadline = time.monotonic() + 5
        while len(seen) < 2:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.01)
        # An Error without req and the ack are delivered; garbage and a stray answer are not.
        assert seen == [Error(text="unsolicited"), HeartbeatAck(0, "e1")]
        assert isinstance(await link.request(ping(), 5), AdminReply)
    finally:
        await link.close()
        await router.stop()


async def test_receive_returns_what_is_not_an_answer(endpoint: str) -> None:
    router = Router(endpoint).start()
    link = BusLink(endpoint, None, name="shard 0")
    try:
        deadline = time.monotonic() + 5
        while not await link.send(AdminRequest(req=5, op="hello")):  # False until the connection is up
            assert time.monotonic() < deadline, "never connected"
            await asyncio.sleep(0.01)
        assert await link.receive(5) == []  # the echo answers req 5, which no request() waits for
        await router.send(HeartbeatAck(0, "e1").encode())
        assert await link.receive(5) == [HeartbeatAck(0, "e1")]
        assert await link.receive(0.05) == []
    finally:
        await link.close()
        await router.stop()


async def test_ask_all_gives_one_answer_per_shard(endpoint: str) -> None:
    router = Router(endpoint).start()
    links = [BusLink(endpoint, None, name="shard 0"), BusLink(f"tcp://127.0.0.1:{free_port()}", None, name="shard 1")]
    for link in links:
        link.start()
    try:
        up, down = await ask_all(links, ping("list"), 0.5)
        assert isinstance(up, AdminReply) and up.data == {"op": "list"}
        assert isinstance(down, NoAnswer) and down.name == "shard 1" and not down.sent
    finally:
        for link in links:
            await link.close()
        await router.stop()


@pytest.mark.parametrize("direct", [False, True])
async def test_closing_fails_the_waiting_requests(endpoint: str, direct: bool) -> None:
    router = Router(endpoint, lambda r: []).start()
    link = BusLink(endpoint, None, name="shard 0", direct=direct)
    link.start()
    try:
        waiting = asyncio.create_task(link.request(ping(), 30))
        deadline = time.monotonic() + 5
        while not router.received:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await link.close()
        with pytest.raises(NoAnswer, match="was closed before it answered"):
            await waiting
        # A request made after the close (a session still storing while its frontend stops) gets NoAnswer too,
        # so the client hears 451 instead of the session ending in a traceback.
        with pytest.raises(NoAnswer, match="is closed") as late:
            await link.request(ping(), 30)
        assert not late.value.sent
    finally:
        await router.stop()


async def test_curve_only_the_cluster_key_gets_answers(tmp_path: Path, endpoint: str) -> None:
    keys = generate_key_file(tmp_path / "cluster")
    stranger = generate_key_file(tmp_path / "stranger")
    context = zmq.asyncio.Context()
    authenticator = start_authenticator(context, keys)
    router = Router(endpoint, context=context)
    secure_server(router.socket, keys)
    router.start()
    member = BusLink(endpoint, keys, name="shard 0")
    outsider = BusLink(endpoint, stranger, name="shard 0")
    member.start()
    outsider.start()
    try:
        assert isinstance(await member.request(ping(), 5), AdminReply)
        with pytest.raises(NoAnswer):
            await outsider.request(ping(), 0.5)
        assert [r.req for r in router.received] == [1]
    finally:
        await member.close()
        await outsider.close()
        await router.stop()
        assert authenticator is not None
        authenticator.stop()
        context.term()


PAUSABLE_SHARD = """
import sys, zmq
socket = zmq.Context.instance().socket(zmq.ROUTER)
socket.bind(sys.argv[1])
print("bound", flush=True)
while True:
    identity, frame = socket.recv_multipart()
    socket.send_multipart([identity, frame])
"""


async def disconnects_within(link: BusLink, seconds: float) -> bool:
    """Whether ZeroMQ reports the link's connection lost within `seconds`."""
    monitor = link.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        return bool(await monitor.poll(timeout=int(seconds * 1000)))
    finally:
        link.socket.disable_monitor()
        monitor.close(linger=0)


@pytest.mark.parametrize("liveness", [0.6, None])
async def test_liveness_drops_the_connection_to_a_paused_shard(endpoint: str, liveness: float | None) -> None:
    """A SIGSTOPped shard keeps its TCP connection open: only ZMTP heartbeats notice it is gone."""
    shard = subprocess.Popen([sys.executable, "-c", PAUSABLE_SHARD, endpoint], stdout=subprocess.PIPE)
    link = BusLink(endpoint, None, name="shard 0", liveness=liveness)
    link.start()
    try:
        assert shard.stdout is not None and shard.stdout.readline() == b"bound\n"
        answer = await link.request(ping(), 10)  # the shard echoes the request frame back
        assert isinstance(answer, AdminRequest) and answer.req == 1
        os.kill(shard.pid, signal.SIGSTOP)
        assert await disconnects_within(link, 3) is (liveness is not None)
        os.kill(shard.pid, signal.SIGCONT)
        assert isinstance(await request_until_answered(link, time.monotonic() + 10), AdminRequest)
    finally:
        os.kill(shard.pid, signal.SIGCONT)
        shard.kill()
        shard.wait()
        assert shard.stdout is not None
        shard.stdout.close()
        await link.close()


async def test_a_direct_link_is_woken_by_frames_and_by_its_own_sends(endpoint: str) -> None:
    """Direct mode (the worker's links): sends skip pyzmq's asyncio layer and `receive` waits on the socket's
    descriptor itself; a receive that waits while this side keeps sending still gets every answer."""
    router = Router(endpoint, lambda request: [Error(text=request.op)]).start()
    link = BusLink(endpoint, None, name="shard 0", direct=True)
    got: list[BusMessage] = []
    try:
        started = time.monotonic()
        assert await link.receive(0.2) == [] and time.monotonic() - started >= 0.15  # nothing came: the timeout

        async def receive_all() -> None:
            while len(got) < 200:
                got.extend(await link.receive(None))

        receiving = asyncio.create_task(receive_all())
        deadline = time.monotonic() + 5
        for number in range(200):
            while not link.send_now(AdminRequest(req=number + 1, op=f"m{number}").encode()):
                assert time.monotonic() < deadline, "never connected"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
        await asyncio.wait_for(receiving, 5)
        assert got == [Error(text=f"m{number}") for number in range(200)]
    finally:
        await link.close()
        await router.stop()


def test_a_direct_link_times_out_under_uvloop_however_its_timer_rounds(endpoint: str) -> None:
    """uvloop runs a timer up to a millisecond before loop.time() reaches it: a receive with nothing coming
    must still return when its timeout fires (it once waited on without a timer, and the worker never
    heartbeated again)."""
    import uvloop

    async def receives() -> None:
        link = BusLink(endpoint, None, name="shard 0", direct=True)
        try:
            for number in range(40):
                timeout = 0.0004 + number * 0.0003
                assert await asyncio.wait_for(link.receive(timeout), 2) == []
        finally:
            await link.close()

    uvloop.run(receives())


async def test_a_direct_link_whose_context_is_torn_down_logs_once_and_stops_watching(
        endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    """A context terminated while its socket is open makes every look at the socket fail and its descriptor
    stay readable: one error line, the descriptor no longer watched (it was an error from the loop at every
    turn, and the waiting receive never woke), and the receive gets the error."""
    context = zmq.asyncio.Context()
    link = BusLink(endpoint, None, name="shard 0", context=context, direct=True)
    terminating = threading.Thread(target=context.term)
    assert await link.receive(0.01) == []  # the descriptor is watched from now on
    receiving = asyncio.create_task(link.receive(None))
    try:
        await asyncio.sleep(0)  # the receive runs up to its wait on the descriptor
        terminating.start()
        with pytest.raises(zmq.ZMQError):
            await asyncio.wait_for(receiving, 5)
        for _ in range(100):  # the loop turns on: nothing more is logged
            await asyncio.sleep(0)
        with pytest.raises(zmq.ZMQError):
            await asyncio.wait_for(link.receive(None), 5)  # a later receive fails at once, watches nothing
        errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
        assert len(errors) == 1 and "no longer watched" in errors[0], errors
    finally:
        receiving.cancel()
        await link.close()
        if terminating.ident is not None:
            terminating.join(5)


async def test_a_send_that_leaves_as_its_connect_wait_ends_counts_as_sent(endpoint: str) -> None:
    """Through the asyncio layer: the shard's connection comes as the request's connect bound passes, and pyzmq
    sends the waiting frame in the same loop turn as the bound's timer. The request used to be cancelled after
    its frame had left and reported the shard unreachable (NoAnswer.sent False: nothing sent) while the shard
    had it: a change the CLI calls not made, an Inject stored and retried. A frame that left is a sent request."""
    link = BusLink(endpoint, None, name="shard 0")
    link.start()
    router = Router(endpoint)
    loop = asyncio.get_running_loop()
    # Told when the link's own side of the connection is up, without touching the link's socket.
    context = zmq.Context.shadow(link.socket.context.underlying)
    monitor_address = f"inproc://monitor-{id(link)}"
    link._plain.monitor(monitor_address, zmq.EVENT_HANDSHAKE_SUCCEEDED)
    monitor = context.socket(zmq.PAIR)
    monitor.connect(monitor_address)
    try:
        waiting = asyncio.create_task(link.request(ping(), 5, connect_timeout=0.2))
        await asyncio.sleep(0)
        bound_by = loop.time() + 0.2  # the request's connect bound passes no later than this

        def shard_appears_as_the_bound_passes() -> None:
            router.socket.bind(endpoint)
            router.task = asyncio.create_task(router._serve())
            assert monitor.poll(5000), "the link did not connect"
            # The loop is held (not a wait for a condition: the turn is made to come late) until the bound has
            # passed, so its timer and the connection are handled in the same turn.
            time.sleep(max(0.0, bound_by - loop.time()) + 0.02)
            link.socket.send(b"", flags=zmq.NOBLOCK)  # another send joins: pyzmq looks at the socket next turn

        loop.call_later(0.05, shard_appears_as_the_bound_passes)
        try:
            answer: BusMessage | NoAnswer = await waiting
        except NoAnswer as missing:
            answer = missing
        deadline = time.monotonic() + 2  # a frame that left reaches the shard within this (loopback)
        while not router.received and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        got = [r for r in router.received if r.op == "ping"]
        if got:  # the frame left: the request must not say it did not
            assert not (isinstance(answer, NoAnswer) and not answer.sent), (answer, got)
        assert got, ("the scenario did not happen: the frame never left", answer)
    finally:
        monitor.close(linger=0)
        await link.close()
        await router.stop()
