"""The queue shard service: one asyncio process owning one spool, serving the bus on one ROUTER socket.

This module is only the process around the queue manager (core.py): it binds the socket (CURVE), receives
frames, decodes them and hands each message to `ShardCore.handle`, sends what the core answers, ticks the
core's maintenance every TIMER_INTERVAL, and runs the background tasks (group-commit writer, dispatcher,
outbox forwarder, the drain's watch of the other shards). What happens to each message is in the module
core.py routes it to.

Receiving and ticking share one loop, and a tick judges workers silent (expiry) only right after the socket
was read empty: after a pause (SIGSTOP, a stalled host) the heartbeats and Results waiting in the socket are
handled before anyone is taken for dead, so finished jobs are not dispatched again; and the time the shard
itself was stalled (a tick late by STALL or more) is not held against the workers, since what they sent
meanwhile may still be on its way through ZeroMQ's I/O thread (issue 8).
Starting: the spool is opened and the socket bound, and the shard is ready (takes new mail, dispatches) before
its queue is read: the queue is read in the background, chunk by chunk (core.py, loading), and a "queue loaded"
line follows. A failure to read it stops the shard (the supervisor starts it again).
Stopping: dispatching stops first, and the Results of the jobs in flight are awaited (up to STOP_DRAIN
seconds) while workers still run (`mtacluster up` stops shards before workers), and mail stored in flight
but never sent is written back as ready (dispatch.py), so a clean stop leaves no recipient marked in flight.

Inputs: frames from frontends, workers, other shards' outboxes and the admin CLI (cluster/bus/schemas.py).
Outputs: the answers, Delivers, and an Error for any frame it cannot understand.
Failure modes: a frame that does not decode, or whose handler fails, is answered with Error and the shard
keeps serving (ARCHITECTURE.md contract 6); on stop, requests being stored get STOP_GRACE seconds to finish.
Durability (ARCHITECTURE.md contracts 1 and 2) is kept by the parts: see core.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import zmq
import zmq.asyncio

from cluster.bus.schemas import (
    BusMessage,
    Error,
    SchemaError,
    decode,
)
from cluster.bus.security import cluster_keys, secure_server, start_authenticator
from cluster.bus.watch import FrameWatch
from cluster.config import Config
from cluster.queue.core import ShardCore
from cluster.queue.maintenance import TIMER_INTERVAL
from cluster.queue.scheduler import Scheduler
from cluster.queue.spool import Spool, SqliteSpool

log = logging.getLogger("mtacluster.queue")

# On stop, requests already being stored get this long to finish and be answered.
STOP_GRACE = 5.0
# On stop, the Results of the jobs in flight are awaited this long (below `mtacluster up`'s grace period).
STOP_DRAIN = 10.0
# Frames handled in one go before other tasks get a turn; the socket counts as drained when a read finds none.
FRAMES_PER_TURN = 200
# A tick this late (seconds) means the shard itself was stalled; the time is not held against the workers.
STALL = 1.0
# Room for the envelope and framing around the largest body in one bus frame.
FRAME_SLACK = 1024 * 1024
# ZeroMQ flags and options as plain ints: pyzmq's enum forms cost a Python-level Flag operation on each use.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
# The send of pyzmq's compiled socket: the Python-level `Socket.send` only adds DRAFT options (routing_id,
# group) the shard never uses, then calls this (half the cost of a small frame's send, issue 12).
_SEND: Callable[[zmq.Socket[bytes], bytes, int], object] = zmq.backend.Socket.send
# ... and its receive (flags, copy): a copy gives bytes, no copy a Frame.
_RECV: Callable[[zmq.Socket[bytes], int, bool], bytes | zmq.Frame] = zmq.backend.Socket.recv


def bind_endpoint(endpoint: str) -> str:
    """What to bind for a configured shard endpoint: an IP literal exactly, a DNS name as tcp://*:PORT."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"tcp://*:{port}"
    return endpoint


class Shard:
    def __init__(self, config: Config, index: int, clock: Callable[[], float] = time.time,
                 spool: Spool | None = None) -> None:
        self.config = config
        self.index = index
        directory = Path(config.queue.spool_dir) / f"shard-{index}"
        self.core = ShardCore(config, index, spool or SqliteSpool(directory), clock, self.send,
                              directory=directory if spool is None else None, send_now=self.send_now)
        self._socket: zmq.asyncio.Socket | None = None
        # The same socket used directly (no future per frame): frames are sent and read without blocking, and
        # waited for through its descriptor (cluster/bus/watch.py, as the worker's direct links do).
        self._raw: zmq.Socket[bytes] | None = None
        self._watch: FrameWatch | None = None

    def is_ready(self) -> bool:
        return self.core.ready

    @property
    def epoch(self) -> str:
        return self.core.epoch

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    async def read_bodies(self, queue_ids: list[str]) -> dict[str, bytes]:
        return await self.core.io.read_bodies(queue_ids)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        context = zmq.asyncio.Context()
        authenticator = None
        writer: asyncio.Task[None] | None = None
        others: list[asyncio.Task[None]] = []
        loading: asyncio.Task[None] | None = None
        try:
            await self.core.open_spool()
            writer = asyncio.create_task(self.core.io.run_writer())
            keys = cluster_keys(self.config.bus)
            authenticator = start_authenticator(context, keys)
            socket = context.socket(zmq.ROUTER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
            socket.setsockopt(zmq.IPV6, 1)
            # A frame far above the largest message we accept is an error or an attack: zmq drops the peer.
            socket.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.smtp.max_message_size + FRAME_SLACK)
            secure_server(cast("zmq.Socket[bytes]", socket), keys)
            endpoint = bind_endpoint(self.config.queue.shards[self.index])
            try:
                socket.bind(endpoint)
            except zmq.ZMQError as exc:
                socket.close(linger=0)
                raise OSError(f"cannot listen on {endpoint}: {exc}") from None
            self._socket = socket
            self._raw = zmq.Socket.shadow(socket.underlying)
            self._watch = FrameWatch(self._raw)
            others = [asyncio.create_task(coro) for coro in (
                self._serve_loop(), self.core.dispatcher.run(), self.core.outbox.forward_loop(context),
                self.core.drain.watch_peers(context))]
            loading = asyncio.create_task(self.core.load_queue())
            self.core.ready = True
            log.info("shard %d ready: %d messages queued, being read in the background", self.index,
                     self.core.queue_total)
            stopping = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if loading.done():
                    loading.result()  # a queue that cannot be read stops the shard
                await stopping
            finally:
                stopping.cancel()
        finally:
            self.core.ready = False
            if loading is not None and not loading.done():
                loading.cancel()
                await asyncio.gather(loading, return_exceptions=True)
            if others:
                await self._drain_jobs(STOP_DRAIN)
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self.core.settle(STOP_GRACE)
            if writer is not None:
                await self.core.dispatcher.unmark()  # mail stored in flight but never sent is ready again
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            self._raw = None
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None
            if authenticator is not None:
                authenticator.stop()
            context.term()
            await self.core.close()

    # -- the bus ------------------------------------------------------------------------------------------

    async def send(self, identity: bytes, message: BusMessage) -> None:
        self.send_now(identity, message)

    def send_now(self, identity: bytes, message: BusMessage) -> None:
        """Send without waiting (what `send` does; this one can be called from a callback)."""
        raw = self._raw
        if raw is None:
            return
        payload = message.encode()
        try:
            # A ROUTER socket never blocks a send: a frame for a peer that is gone or full is dropped.
            _SEND(raw, identity, _NOBLOCK | _SNDMORE)
            _SEND(raw, payload, _NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("shard %d: cannot send %s: %s", self.index, message.TYPE, exc)
        if self._watch is not None:
            self._watch.sent()  # a send may take in the notice of frames waiting (bus/watch.py)

    def _recv(self) -> list[bytes | memoryview] | None:
        """The next waiting message's frames, or None when none is waiting: the identity as bytes, the others as
        views of ZeroMQ's own message (a 1 MiB Inject is not copied into a bytes first; decoding copies its body
        once; a small frame costs about a microsecond more this way). A message on a ROUTER socket has the
        identity and at least one frame; whether more follow is the frame's own flag (`Frame.more`: no
        getsockopt(RCVMORE) per frame, 2.4 instead of 6 us per message)."""
        raw = self._raw
        if raw is None:
            return None
        try:
            frames: list[bytes | memoryview] = [cast(bytes, _RECV(raw, _NOBLOCK, True))]
        except zmq.Again:
            return None
        frame = cast(zmq.Frame, _RECV(raw, _NOBLOCK, False))
        frames.append(frame.buffer)
        while frame.more:
            frame = cast(zmq.Frame, _RECV(raw, _NOBLOCK, False))
            frames.append(frame.buffer)
        return frames

    async def _drain_jobs(self, grace: float) -> None:
        """Stop dispatching and wait (up to `grace` seconds) for the Results of the jobs in flight."""
        self.core.dispatcher.enabled = False
        jobs = self.core.scheduler.jobs
        if not jobs:
            return
        log.info("shard %d stopping: dispatching stopped, waiting up to %gs for %d jobs in flight", self.index,
                 grace, len(jobs))
        deadline = time.monotonic() + grace
        while jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.core.idle_outcomes(max(0.0, deadline - time.monotonic()))
        if jobs:
            log.warning("shard %d stopping with %d jobs still in flight: their recipients are queued again at the "
                        "next start (possible duplicates)", self.index, len(jobs))

    async def _serve_loop(self) -> None:
        """Read frames and tick the maintenance in one loop, so that expiry only runs once the socket is empty."""
        watch = self._watch
        assert watch is not None
        loop = asyncio.get_running_loop()
        next_tick = time.monotonic() + TIMER_INTERVAL
        wake_at = loop.time() + TIMER_INTERVAL  # the same moment on the loop's clock (the watch's timer)
        last_drained = time.monotonic()
        while True:
            drained = False
            # Frames (at once when some wait already) or the tick's time; the waits of one tick share one timer.
            tick_due = not await watch.wait(wake_at)
            if not tick_due:
                for _ in range(FRAMES_PER_TURN):
                    frames = self._recv()
                    if frames is None:
                        drained = True
                        break
                    await self._on_frames(frames)
                await asyncio.sleep(0)  # the dispatcher, the writer and the request handlers get a turn
            else:
                drained = True
            now = time.monotonic()
            if drained:
                last_drained = now
            if tick_due or now >= next_tick:
                stalled = now - next_tick
                if stalled >= STALL:
                    log.warning("shard %d was stalled for %.1fs (paused?): that time does not count as the "
                                "workers' silence", self.index, stalled)
                    self.core.scheduler.excuse(stalled)
                # Under a flood that never leaves the socket empty, expiry still runs once a worker_timeout.
                self.core.tick(now, expire=drained or now - last_drained >= self.config.queue.worker_timeout)
                next_tick = now + TIMER_INTERVAL
                wake_at = loop.time() + TIMER_INTERVAL

    async def _on_frames(self, frames: list[bytes | memoryview]) -> None:
        if len(frames) < 2 or type(frames[0]) is not bytes:
            return
        identity, payload = frames[0], frames[-1]
        try:
            message = decode(payload)
        except SchemaError as exc:
            await self.send(identity, Error(f"bad frame: {exc}", req=exc.req))
            return
        try:
            await self.core.handle(identity, message)
        except Exception:  # one bad request must not make the shard deaf (contract 6)
            log.exception("shard %d: cannot handle a %s message", self.index, message.TYPE)
            req = getattr(message, "req", 0)
            await self.send(identity, Error(f"the shard failed to handle this {message.TYPE}",
                                            req=req if isinstance(req, int) else 0))
