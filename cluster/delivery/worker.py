"""The worker role: takes delivery jobs from every queue shard and sends back one Result per job.

Protocol (cluster/bus/schemas.py): one DEALER socket per shard in `queue.shards`. Every
`queue.heartbeat_interval` the worker sends Heartbeat(worker, free, in_flight, seen) to each shard: `free` is how
many more jobs it takes from that shard (`delivery.concurrency` minus the jobs it holds from it), `in_flight`
the ids of those jobs (renewing their leases). Each Deliver starts an asyncio task running
`Deliverer.deliver`; its outcomes go back as Result(job_id, worker, outcomes). A HeartbeatAck whose
shard_epoch differs from the last one means the shard restarted and forgot us: the worker heartbeats again at
once so the shard learns its credits.

Failure modes: an undecodable or unexpected frame is logged and dropped (never a crash). A Deliver for a job
already running is ignored. An unexpected error inside a delivery defers all its recipients with 451 4.3.0
(the mail stays queued). Nothing is queued for an unreachable shard (ZMQ_IMMEDIATE): heartbeats are skipped,
and a Result that cannot be sent is kept and retried before each heartbeat, its job still listed as in flight
(a worker that dies meanwhile leaves it to the shard's lease: a possible duplicate, never a loss). On stop,
running jobs get `SHUTDOWN_GRACE` seconds to finish; the rest are abandoned and come back to the shard through
their leases.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import cast

import zmq
import zmq.asyncio

from cluster.bus.schemas import (
    Deliver,
    Error,
    Heartbeat,
    HeartbeatAck,
    Outcome,
    Result,
    SchemaError,
    decode,
)
from cluster.bus.security import cluster_keys, secure_client
from cluster.config import Config
from cluster.delivery import metrics
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.deliver import Deliverer
from cluster.delivery.mx import CachingMxResolver, DnsMxResolver, MxResolver

log = logging.getLogger(__name__)

# Seconds that running jobs get to finish after stop is requested.
SHUTDOWN_GRACE = 5.0
# Frames handled from one shard before other tasks get a turn.
FRAMES_PER_TURN = 100
# How often idle cached connections are checked for expiry.
PRUNE_INTERVAL = 1.0


class _ShardLink:
    """One DEALER socket to one shard and the jobs taken from it."""

    def __init__(self, context: zmq.asyncio.Context, index: int, endpoint: str, config: Config) -> None:
        self.index = index
        self.endpoint = endpoint
        self.socket = context.socket(zmq.DEALER)
        secure_client(cast("zmq.Socket[bytes]", self.socket), cluster_keys(config.bus))
        self.socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a shard that is not connected: a burst of old heartbeats (with old in_flight lists)
        # arriving when it comes back would mislead it. Results that cannot go out wait in `unsent` instead.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.connect(endpoint)
        self.jobs: dict[str, asyncio.Task[None]] = {}
        # Results not yet accepted by the socket (shard unreachable): retried before every heartbeat, and their
        # jobs stay listed as in flight so the shard keeps their leases.
        self.unsent: dict[str, bytes] = {}
        # Bounds the deliveries running at once even if the shard sends more jobs than it had credits for.
        self.slots = asyncio.Semaphore(config.delivery.concurrency)
        self.epoch: str | None = None
        self.last_ack = float("-inf")
        # seq of the last Deliver received from the shard instance `epoch` (echoed in heartbeats, so the shard
        # knows which jobs we must have: see bus/schemas.py).
        self.seen = 0

    async def send(self, frame: bytes, what: str) -> bool:
        try:
            await self.socket.send(frame, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("shard %d (%s): not connected, %s not sent", self.index, self.endpoint, what)
            return False
        except zmq.ZMQError as exc:
            log.warning("shard %d (%s): cannot send %s: %s", self.index, self.endpoint, what, exc)
            return False
        return True


class Worker:
    def __init__(self, config: Config, name: str | None = None, resolver: MxResolver | None = None) -> None:
        self.config = config
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.resolver: MxResolver = resolver or CachingMxResolver(DnsMxResolver(config.delivery.nameservers))
        delivery = config.delivery
        self.cache = ConnectionCache(delivery.connection_idle_timeout, delivery.max_deliveries_per_connection)
        self.deliverer = Deliverer(config, self.resolver, self.cache)
        self._links: list[_ShardLink] = []
        self._stopping = False

    def is_ready(self) -> bool:
        if not self._links:
            return False
        return self._shards_connected() == len(self._links)

    def _shards_connected(self) -> int:
        now = time.monotonic()
        window = self.config.queue.worker_timeout
        connected = sum(1 for link in self._links if now - link.last_ack < window)
        metrics.SHARDS_CONNECTED.set(connected)
        return connected

    async def run(self, stop: asyncio.Event) -> None:
        context = zmq.asyncio.Context.instance()
        self._links = [_ShardLink(context, i, endpoint, self.config)
                       for i, endpoint in enumerate(self.config.queue.shards)]
        tasks = [asyncio.create_task(self._serve_link(link)) for link in self._links]
        tasks.append(asyncio.create_task(self._prune_forever()))
        try:
            await stop.wait()
        finally:
            self._stopping = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._finish_jobs()
            for link in self._links:
                for frame in link.unsent.values():
                    await link.send(frame, "result")  # one last try; the shard's lease covers a failure
            self.cache.close_all()
            for link in self._links:
                link.socket.close(linger=0)
            metrics.SHARDS_CONNECTED.set(0)

    async def _finish_jobs(self) -> None:
        running = [task for link in self._links for task in link.jobs.values()]
        if not running:
            return
        _, abandoned = await asyncio.wait(running, timeout=SHUTDOWN_GRACE)
        for task in abandoned:
            task.cancel()
        if abandoned:
            log.info("abandoned %d jobs at shutdown; their shards take them back when the leases expire",
                     len(abandoned))
            await asyncio.gather(*abandoned, return_exceptions=True)

    async def _heartbeat(self, link: _ShardLink) -> None:
        if self._stopping:
            return
        for job_id, frame in list(link.unsent.items()):
            if not await link.send(frame, "result"):
                break
            del link.unsent[job_id]
        held = [*link.jobs, *(job_id for job_id in link.unsent if job_id not in link.jobs)]
        free = max(0, self.config.delivery.concurrency - len(held))
        await link.send(Heartbeat(worker=self.name, free=free, in_flight=held, seen=link.seen,
                                  seen_epoch=link.epoch or "").encode(), "heartbeat")

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            self.cache.prune()

    async def _serve_link(self, link: _ShardLink) -> None:
        """Receive from one shard and heartbeat to it, in one loop: every heartbeat is sent after all the frames
        that had arrived were handled, so its in_flight list includes every Deliver already received (a shard
        re-queues jobs missing from it)."""
        interval = self.config.queue.heartbeat_interval
        next_beat = time.monotonic()
        while True:
            wait_ms = max(0, int((next_beat - time.monotonic()) * 1000))
            if await link.socket.poll(timeout=wait_ms):
                # A bounded batch, then a turn for the other tasks (the deliveries) and the heartbeat check.
                for _ in range(FRAMES_PER_TURN):
                    try:
                        frames = await link.socket.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    await self._on_frame(link, frames[-1])
                await asyncio.sleep(0)
            if time.monotonic() >= next_beat:
                await self._heartbeat(link)
                self._shards_connected()
                next_beat = time.monotonic() + interval

    async def _on_frame(self, link: _ShardLink, frame: bytes) -> None:
        try:
            message = decode(frame)
        except SchemaError as exc:
            log.warning("shard %d sent an undecodable frame: %s", link.index, exc)
            return
        if isinstance(message, HeartbeatAck):
            await self._on_ack(link, message)
        elif isinstance(message, Deliver):
            await self._on_deliver(link, message)
        elif isinstance(message, Error):
            log.warning("shard %d reports an error: %s", link.index, message.text)
        else:
            log.warning("shard %d sent an unexpected %s", link.index, message.TYPE)

    async def _on_ack(self, link: _ShardLink, ack: HeartbeatAck) -> None:
        link.last_ack = time.monotonic()
        restarted = link.epoch is not None and ack.shard_epoch != link.epoch
        if ack.shard_epoch != link.epoch:
            # A new shard instance numbers its Delivers from 1; its ack arrives before any of them.
            link.seen = 0
        link.epoch = ack.shard_epoch
        if restarted:
            log.info("shard %d restarted (new epoch %s): announcing ourselves again", link.index, ack.shard_epoch)
            await self._heartbeat(link)

    async def _on_deliver(self, link: _ShardLink, job: Deliver) -> None:
        link.seen = max(link.seen, job.seq)
        if self._stopping:
            return  # not in our heartbeats any more: the shard takes it back
        if job.job_id in link.jobs:
            log.warning("shard %d sent job %s again while it is running; ignored", link.index, job.job_id)
            return
        if not job.recipients:
            await link.send(Result(job_id=job.job_id, worker=self.name, outcomes=[]).encode(), "result")
            return
        task = asyncio.create_task(self._run_job(link, job))
        link.jobs[job.job_id] = task
        metrics.JOBS_IN_FLIGHT.inc()

    async def _run_job(self, link: _ShardLink, job: Deliver) -> None:
        started = time.perf_counter()
        try:
            async with link.slots:
                outcomes = await self.deliverer.deliver(job)
        except asyncio.CancelledError:
            link.jobs.pop(job.job_id, None)
            metrics.JOBS_IN_FLIGHT.dec()
            raise
        except Exception:  # a bug in delivery must not lose the job nor kill the worker: defer it
            log.exception("delivery of job %s failed unexpectedly; deferring its recipients", job.job_id)
            outcomes = [Outcome(recipient=r, status="deferred", code=451, enhanced="4.3.0",
                                text="Internal error in the delivery worker") for r in job.recipients]
        frame = Result(job_id=job.job_id, worker=self.name, outcomes=outcomes).encode()
        if not await link.send(frame, "result"):
            link.unsent[job.job_id] = frame
        link.jobs.pop(job.job_id, None)
        metrics.JOBS_IN_FLIGHT.dec()
        metrics.DURATION.observe(time.perf_counter() - started)
