"""FrameWatch (cluster/bus/watch.py), the wait for frames the shard's socket and the worker's direct links share:
no wakeup lost under ZeroMQ's edge-triggered descriptor while both sides send and wait (20,000 frames each way,
both sides waiting on FrameWatch, under asyncio and uvloop), a deadline's timer shared by the waits for it, and a
closed watch never touching its socket."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
import zmq

from cluster.bus.watch import TIMER_SLACK, FrameWatch

FRAMES = 20_000
WINDOW = 64  # frames the dealer keeps on their way: the sends of one side meet the other's arrivals


def _pair(context: zmq.Context[zmq.Socket[bytes]]) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


@contextlib.contextmanager
def _watched_router() -> Iterator[tuple[FrameWatch, zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A connected ROUTER/DEALER pair and a FrameWatch on the router; the watch closed (closing twice is allowed)
    and the context destroyed at the end."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router, dealer = _pair(context)
    watch = FrameWatch(router)
    try:
        yield watch, router, dealer
    finally:
        watch.close()
        context.destroy(linger=0)


def _read_all(socket: zmq.Socket[bytes]) -> list[list[bytes]]:
    messages = []
    while True:
        try:
            messages.append(socket.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return messages


async def _ping_pong() -> tuple[int, int]:
    """The dealer keeps WINDOW frames going and the router echoes each. On each side one task waits for frames
    (FrameWatch, no deadline) while another task sends on the same socket, as in the shard (its serve loop
    waits while the dispatcher and the commits send) and in the worker (its receive waits while jobs send
    Results): a send that takes in the notice of arrived frames must still wake the waiter. One lost wakeup
    leaves both sides waiting for ever (caught by the test's timeout)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router, dealer = _pair(context)
    router_watch, dealer_watch = FrameWatch(router), FrameWatch(dealer)
    to_echo: deque[list[bytes]] = deque()
    echo_due, window_open = asyncio.Event(), asyncio.Event()
    sent = received = echoed = 0

    async def router_reads() -> None:
        while True:
            await router_watch.wait()
            to_echo.extend(_read_all(router))
            echo_due.set()

    async def router_sends() -> None:
        nonlocal echoed
        while True:
            await echo_due.wait()
            echo_due.clear()
            while to_echo:
                router.send_multipart(to_echo.popleft(), zmq.NOBLOCK)
                router_watch.sent()
                echoed += 1
                if echoed % 5 == 0:
                    await asyncio.sleep(0)  # the reading side gets turns between the sends

    async def dealer_sends() -> None:
        nonlocal sent
        while sent < FRAMES:
            await window_open.wait()
            window_open.clear()
            while sent < FRAMES and sent - received < WINDOW:
                dealer.send(b"%d" % sent, zmq.NOBLOCK)
                dealer_watch.sent()
                sent += 1
                if sent % 3 == 0:
                    await asyncio.sleep(0)

    tasks = [asyncio.create_task(coroutine) for coroutine in (router_reads(), router_sends(), dealer_sends())]
    try:
        window_open.set()
        while received < FRAMES:
            await dealer_watch.wait()
            for (frame,) in _read_all(dealer):
                assert frame == b"%d" % received  # in order, none lost
                received += 1
            window_open.set()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        router_watch.close()
        dealer_watch.close()
        context.destroy(linger=0)
    return echoed, received


def _run(make: Callable[[], Coroutine[Any, Any, Any]], *, use_uvloop: bool) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(make(), 60)

    return uvloop.run(bounded()) if use_uvloop else asyncio.run(bounded())


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_twenty_thousand_frames_each_way_lose_no_wakeup(use_uvloop: bool) -> None:
    assert _run(_ping_pong, use_uvloop=use_uvloop) == (FRAMES, FRAMES)


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_a_deadline_ends_the_wait_and_its_timer_serves_every_wait_for_it(use_uvloop: bool) -> None:
    async def waits() -> None:
        with _watched_router() as (watch, router, dealer):
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            deadline = loop.time() + 0.1
            assert await watch.wait(deadline) is False
            assert time.monotonic() - started >= 0.09
            assert await watch.wait(deadline) is False  # its timer fired: at once, no new timer
            assert time.monotonic() - started < 1.0
            dealer.send(b"hello")
            assert await watch.wait(loop.time() + 5) is True
            assert _read_all(router)[0][1] == b"hello"
            assert watch.readable() is False

    _run(waits, use_uvloop=use_uvloop)


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_a_nearby_deadline_keeps_the_pending_timer_and_an_earlier_one_moves_it(use_uvloop: bool) -> None:
    """The worker works its heartbeat deadline out again before every wait: deadlines within TIMER_SLACK of the
    pending timer's keep that timer (none made and cancelled per wait); an earlier one must still end on time."""
    async def waits() -> None:
        with _watched_router() as (watch, _router, _dealer):
            loop = asyncio.get_running_loop()
            far = loop.time() + 30
            for deadline in (far, far + TIMER_SLACK / 2, far - TIMER_SLACK / 2):
                waiting = asyncio.create_task(watch.wait(deadline))
                await asyncio.sleep(0.01)  # waiting, the frame never comes: given up (as a found frame ends it)
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
                if deadline == far:
                    timer = watch._timer
                assert timer is not None and watch._timer is timer
            started = time.monotonic()
            assert await asyncio.wait_for(watch.wait(loop.time() + 0.05), 5) is False
            assert time.monotonic() - started < 2

    _run(waits, use_uvloop=use_uvloop)


def test_a_closed_watch_wakes_its_waiter_and_never_touches_the_socket() -> None:
    async def closes() -> None:
        with _watched_router() as (watch, router, _dealer):
            waiting = asyncio.create_task(watch.wait())
            await asyncio.sleep(0.01)
            assert not waiting.done()
            watch.close()
            with pytest.raises(zmq.ZMQError):
                await asyncio.wait_for(waiting, 5)
            router.close(linger=0)
            with pytest.raises(zmq.ZMQError):
                watch.readable()

    asyncio.run(closes())
