"""The queue shard service: one asyncio process owning one spool, serving the bus on one ROUTER socket.

Inputs (cluster/bus/schemas.py): Inject from frontends, Heartbeat/Result from workers, AdminRequest from the
CLI. Outputs: Stored/InjectRefused, HeartbeatAck/Deliver, AdminReply, and Error for any frame it cannot
understand. Tasks: the receive loop, the group-commit writer, the dispatcher (makes jobs while workers have
credits) and a timer (deferred -> ready, lease and worker expiry, disk space, metrics).

Durability (DESIGN.md contracts 1 and 2): Stored is sent only after the transaction holding the message
committed; recipient outcomes are committed before memory trusts them; jobs are marked in flight in the spool
before Deliver is sent, so after a crash they are re-queued and counted as possible duplicates. When the
spool's file system has less than `queue.min_free_space` free, new mail is refused with 452 4.3.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio

from cluster.bus.schemas import (
    AdminReply,
    AdminRequest,
    BusMessage,
    Deliver,
    Error,
    Heartbeat,
    HeartbeatAck,
    Inject,
    InjectRefused,
    Outcome,
    Result,
    SchemaError,
    Stored,
    decode,
)
from cluster.bus.security import cluster_keys, secure_server, start_authenticator
from cluster.config import Config
from cluster.queue import metrics
from cluster.queue.admin import AdminOps
from cluster.queue.bounces import BounceMaker
from cluster.queue.commit import GroupCommitter
from cluster.queue.records import Message, QueueIdFactory, Recipient, RecipientUpdate, State
from cluster.queue.retry import EXPIRED_STATUS, RetrySchedule
from cluster.queue.scheduler import Job, Scheduler, SchedulerLimits
from cluster.queue.spool import Batch, LoadResult, Spool, SpoolError, SqliteSpool

log = logging.getLogger("mtacluster.queue")

TIMER_INTERVAL = 0.1
DISK_CHECK_INTERVAL = 1.0
# On stop, requests already being stored get this long to finish and be answered.
STOP_GRACE = 5.0
# Room for the envelope and framing around the largest body in one bus frame.
FRAME_SLACK = 1024 * 1024


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
        self.clock = clock
        self.label = str(index)
        self.epoch = secrets.token_hex(8)
        self.spool: Spool = spool or SqliteSpool(Path(config.queue.spool_dir) / f"shard-{index}")
        self.scheduler = Scheduler(SchedulerLimits(
            destination_concurrency=config.delivery.destination_concurrency,
            max_recipients=config.delivery.max_recipients_per_transaction,
            lease_time=config.queue.lease_time,
            worker_timeout=config.queue.worker_timeout,
        ), job_prefix=f"{self.epoch[:8]}.")
        self.retry = RetrySchedule(config.queue)
        self.ids = QueueIdFactory(index)
        self.bounces = BounceMaker(config, index, self.ids)
        self.admin = AdminOps(self)
        self.disk_free: int | None = None
        self.quarantined: list[str] = []
        self._ready = False
        self._socket: zmq.asyncio.Socket | None = None
        self._committer: GroupCommitter | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wake_dispatch = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        metrics.initialise(self.label)

    def is_ready(self) -> bool:
        return self._ready

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"spool-{self.index}")
        context = zmq.asyncio.Context()
        authenticator = None
        background: list[asyncio.Task[None]] = []
        try:
            loaded = await loop.run_in_executor(self._executor, self._open_and_recover)
            self._adopt(loaded)
            self._committer = GroupCommitter(self.spool, self._executor, self.config.queue.commit_batch_max,
                                             self._observe_commit)
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
            self._refresh_disk()
            background = [asyncio.create_task(coro) for coro in (
                self._committer.run(), self._receive_loop(), self._dispatch_loop(), self._timer_loop(),
                self.bounces.forward_loop(self, context))]
            self._ready = True
            log.info("shard %d ready: %d messages queued", self.index, len(self.scheduler.messages))
            await stop.wait()
        finally:
            self._ready = False
            await self._stop_tasks(background)
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None
            if authenticator is not None:
                authenticator.stop()
            context.term()
            await loop.run_in_executor(self._executor, self.spool.close)
            self._executor.shutdown(wait=True)

    async def _stop_tasks(self, background: list[asyncio.Task[None]]) -> None:
        """Stop taking requests, let the ones being stored finish (bounded), then stop the writer."""
        writer, others = background[:1], background[1:]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_GRACE)
        for task in [*writer, *self._tasks]:
            task.cancel()
        await asyncio.gather(*writer, *self._tasks, return_exceptions=True)

    def _open_and_recover(self) -> LoadResult:
        """In the spool thread: open, load, and make recipients that were in flight at the crash ready."""
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
            metrics.POSSIBLE_DUPLICATES.labels(self.label).inc(len(updates))
            log.warning("shard %d: %d recipients were in flight at the last stop and may be delivered twice",
                        self.index, len(updates))
        return loaded

    def _adopt(self, loaded: LoadResult) -> None:
        for quarantined in loaded.quarantined:
            log.error("shard %d: quarantined damaged record %s (%s) to %s", self.index, quarantined.queue_id,
                      quarantined.reason, quarantined.path)
            self.quarantined.append(quarantined.queue_id)
        for message in loaded.messages:
            if message.forward_shard >= 0:
                self.bounces.outbox_add(message)
            else:
                self.scheduler.add_message(message)
                self.bounces.track(message)

    # -- the bus ------------------------------------------------------------------------------------------

    async def send(self, identity: bytes, message: BusMessage) -> None:
        if self._socket is None:
            return
        try:
            await self._socket.send_multipart([identity, message.encode()])
        except zmq.ZMQError as exc:
            log.warning("shard %d: cannot send %s: %s", self.index, message.TYPE, exc)

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("shard %d: request handler failed", self.index, exc_info=task.exception())

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            if len(frames) < 2:
                continue
            identity, payload = frames[0], frames[-1]
            try:
                message = decode(payload)
                _check_fields(message)
            except SchemaError as exc:
                await self.send(identity, Error(f"bad frame: {exc}"))
                continue
            try:
                await self._handle(identity, message)
            except Exception:  # one bad request must not make the shard deaf (contract 6)
                log.exception("shard %d: cannot handle a %s message", self.index, message.TYPE)
                await self.send(identity, Error(f"the shard failed to handle this {message.TYPE}"))

    async def _handle(self, identity: bytes, message: BusMessage) -> None:
        if isinstance(message, Inject):
            self.spawn(self._on_inject(identity, message))
        elif isinstance(message, Heartbeat):
            await self._on_heartbeat(identity, message)
        elif isinstance(message, Result):
            self._on_result(identity, message)
        elif isinstance(message, AdminRequest):
            self.spawn(self._on_admin(identity, message))
        else:
            await self.send(identity, Error(f"a shard does not accept {message.TYPE!r} messages"))

    async def commit(self, batch: Batch) -> None:
        assert self._committer is not None
        await self._committer.submit(batch)

    def wake_dispatcher(self) -> None:
        self._wake_dispatch.set()

    # -- injects ------------------------------------------------------------------------------------------

    async def _on_inject(self, identity: bytes, inject: Inject) -> None:
        if not inject.recipients or any(not r for r in inject.recipients):
            await self.send(identity, InjectRefused(inject.req, 554, "5.5.1", "No valid recipients"))
            return
        if self.disk_free is not None and self.disk_free < self.config.queue.min_free_space:
            metrics.INJECTS_REFUSED.labels(self.label, "disk_full").inc()
            await self.send(identity, InjectRefused(inject.req, 452, "4.3.1", "Insufficient system storage"))
            return
        client = {str(k): str(v) for k, v in inject.client.items()}
        try:
            stored = await self.store_new(inject.sender, inject.recipients, inject.body, client)
        except SpoolError as exc:
            log.error("shard %d: cannot store a message: %s", self.index, exc)
            if exc.disk_full:
                metrics.INJECTS_REFUSED.labels(self.label, "disk_full").inc()
                await self.send(identity, InjectRefused(inject.req, 452, "4.3.1", "Insufficient system storage"))
            else:
                metrics.INJECTS_REFUSED.labels(self.label, "spool_error").inc()
                await self.send(identity, InjectRefused(inject.req, 451, "4.3.0", "Queue storage failed, try again"))
            return
        await self.send(identity, Stored(inject.req, stored.queue_id))

    async def store_new(self, sender: str, recipients: list[str], body: bytes, client: dict[str, str]) -> Message:
        """Store a new message (group commit) and start scheduling it once it is durable."""
        now = self.clock()
        message = Message(self.ids.new(now), sender, now, [Recipient(i, r) for i, r in enumerate(recipients)],
                          len(body), client)
        await self.commit(Batch(stores=[message], bodies={message.queue_id: body}))
        metrics.STORED.labels(self.label).inc()
        self.scheduler.add_message(message)
        self.bounces.track(message)
        self.wake_dispatcher()
        return message

    # -- workers ------------------------------------------------------------------------------------------

    async def _on_heartbeat(self, identity: bytes, heartbeat: Heartbeat) -> None:
        seen = heartbeat.seen if heartbeat.seen_epoch == self.epoch else 0
        returned = self.scheduler.heartbeat(heartbeat.worker, identity, heartbeat.free, heartbeat.in_flight,
                                            self.clock(), seen)
        if returned:
            metrics.LEASES_EXPIRED.labels(self.label).inc(len(returned))
            log.warning("shard %d: worker %s no longer holds %d jobs; they are ready again", self.index,
                        heartbeat.worker, len(returned))
        await self.send(identity, HeartbeatAck(self.index, self.epoch))
        self.wake_dispatcher()

    async def _dispatch_loop(self) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake_dispatch.wait()
            self._wake_dispatch.clear()
            jobs = self.scheduler.dispatch(self.clock())
            if not jobs:
                continue
            marks = [RecipientUpdate.of(job.queue_id, self.scheduler.messages[job.queue_id].recipients[i])
                     for job in jobs for i in job.indices]
            try:
                await self.commit(Batch(updates=marks))
                bodies = await loop.run_in_executor(self._executor, self.spool.read_bodies,
                                                    {job.queue_id for job in jobs})
            except SpoolError as exc:
                log.error("shard %d: cannot mark jobs in flight: %s", self.index, exc)
                for job in jobs:
                    self.scheduler.return_job(job.job_id)
                continue
            for job in jobs:
                await self._send_job(job, bodies.get(job.queue_id))
            self.wake_dispatcher()

    async def _send_job(self, job: Job, body: bytes | None) -> None:
        worker = self.scheduler.workers.get(job.worker)
        if body is None or worker is None or job.job_id not in self.scheduler.jobs:
            self.scheduler.return_job(job.job_id)
            return
        message = self.scheduler.messages[job.queue_id]
        recipients = [message.recipients[i].address for i in job.indices]
        await self.send(worker.identity, Deliver(job.job_id, job.queue_id, message.sender, recipients, job.domain,
                                                 body, job.attempt, self.scheduler.next_seq(job)))

    def _on_result(self, identity: bytes, result: Result) -> None:
        """Take the job out of flight at once (before the next frame, e.g. a heartbeat no longer listing it),
        then record its outcomes in the background."""
        now = self.clock()
        self.scheduler.seen(result.worker, identity, now)
        self.wake_dispatcher()
        pending = self.scheduler.jobs.get(result.job_id)
        if pending is None or pending.worker != result.worker:
            log.info("shard %d: result for unknown or reassigned job %s ignored", self.index, result.job_id)
            return
        job = self.scheduler.finish_job(result.job_id)
        message = self.scheduler.messages.get(pending.queue_id)
        if job is None or message is None:
            return
        outcomes = {o.recipient.lower(): o for o in result.outcomes}
        changes: list[tuple[Recipient, Recipient]] = []
        for index in job.indices:
            recipient = message.recipients[index]
            outcome = outcomes.get(recipient.address.lower()) or Outcome(
                recipient.address, "deferred", 451, "4.4.0", "the worker returned no outcome for this recipient")
            changes.append((recipient, self._after(message, recipient, outcome, now)))
        connection_trouble = all(
            new.state is State.DEFERRED and _connection_level(outcomes.get(new.address.lower()))
            for _, new in changes)
        if self.scheduler.note_destination(job.domain, connection_trouble, now, self.retry.delay(1)):
            log.warning("shard %d: destination %s backed off after repeated deferrals", self.index, job.domain)
        self.spawn(self.apply_changes(message, changes, now))

    def _after(self, message: Message, recipient: Recipient, outcome: Outcome, now: float) -> Recipient:
        """The recipient's next state after an outcome (a copy; memory changes only after the commit)."""
        reply = f"{outcome.code} {outcome.enhanced} {outcome.text}".strip()
        new = Recipient(recipient.index, recipient.address, recipient.state, recipient.attempts + 1, 0.0, reply,
                        outcome.remote)
        if outcome.status == "delivered":
            new.state = State.DELIVERED
        elif outcome.status == "failed":
            new.state = State.FAILED
        else:
            decision = self.retry.after_deferral(new.attempts, message.arrival, now)
            if decision.give_up:
                new.state = State.FAILED
                new.last_reply = f"{outcome.code} {EXPIRED_STATUS} delivery time expired; last error: {reply}"
            else:
                new.state = State.DEFERRED
                new.next_attempt = decision.next_attempt
        return new

    async def apply_changes(self, message: Message, changes: list[tuple[Recipient, Recipient]], now: float,
                            completed_as: str | None = None, bounce: bool = True, status: str = "") -> None:
        """Commit new recipient states (plus one DSN for the new failures), then make memory follow.

        On a spool error the recipients that were in flight go back to ready, and nothing else changes.
        """
        batch = Batch(updates=[RecipientUpdate.of(message.queue_id, new) for _, new in changes])
        finished = {new.index for _, new in changes if new.state.done}
        if all(r.state.done or r.index in finished for r in message.recipients):
            batch.removals.append(message.queue_id)
        failed = [new for _, new in changes if new.state is State.FAILED]
        dsn = None
        if bounce and failed and message.sender:
            headers = await self.read_headers(message.queue_id) or b""
            dsn = self.bounces.build(message, failed, headers, now, "failed", status)
            if dsn is not None:
                batch.add_message(*dsn)
        try:
            await self.commit(batch)
        except SpoolError as exc:
            log.error("shard %d: cannot record outcomes of %s: %s", self.index, message.queue_id, exc)
            for old, _ in changes:
                if old.state is State.IN_FLIGHT:
                    self.scheduler.set_state(message, old, State.READY)
            self.wake_dispatcher()
            return
        if dsn is not None:
            self.bounces.stored(self, dsn[0])
        if message.queue_id not in self.scheduler.messages:
            return  # deleted by an admin meanwhile
        for old, new in changes:
            old.attempts, old.last_reply, old.remote = new.attempts, new.last_reply, new.remote
            self.scheduler.set_state(message, old, new.state, new.next_attempt)
            if new.state.done:
                outcome = completed_as or ("expired" if EXPIRED_STATUS in new.last_reply.split()[1:2]
                                           else new.state.value)
                metrics.COMPLETED.labels(self.label, outcome).inc()
        if batch.removals:
            self.scheduler.remove_message(message.queue_id)
        self.wake_dispatcher()

    # -- admin --------------------------------------------------------------------------------------------

    async def _on_admin(self, identity: bytes, request: AdminRequest) -> None:
        try:
            data = await self.admin.handle(request.op, request.args)
        except (KeyError, ValueError, TypeError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            await self.send(identity, AdminReply(request.req, False, None, str(message)))
            return
        except SpoolError as exc:
            await self.send(identity, AdminReply(request.req, False, None, f"spool error: {exc}"))
            return
        await self.send(identity, AdminReply(request.req, True, data, ""))

    async def read_bodies(self, queue_ids: list[str]) -> dict[str, bytes]:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.spool.read_bodies, queue_ids)

    async def read_headers(self, queue_id: str) -> bytes | None:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.spool.read_headers, queue_id)

    # -- timer --------------------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        last_disk_check = 0.0
        while True:
            await asyncio.sleep(TIMER_INTERVAL)
            now = self.clock()
            if self.scheduler.promote_due(now):
                self.wake_dispatcher()
            returned = self.scheduler.expire(now)
            if returned:
                metrics.LEASES_EXPIRED.labels(self.label).inc(len(returned))
                log.warning("shard %d: took back %d jobs from silent workers or expired leases", self.index,
                            len(returned))
                self.wake_dispatcher()
            if self.scheduler.end_backoffs(now):
                self.wake_dispatcher()
            if time.monotonic() - last_disk_check >= DISK_CHECK_INTERVAL:
                last_disk_check = time.monotonic()
                self._refresh_disk()
                self.bounces.check_delays(self, now)
            self._refresh_gauges(now)

    def _refresh_disk(self) -> None:
        try:
            self.disk_free = self.spool.free_space()
        except OSError as exc:
            log.error("shard %d: cannot read free space of the spool: %s", self.index, exc)
            return
        metrics.DISK_FREE.labels(self.label).set(self.disk_free)

    def _refresh_gauges(self, now: float) -> None:
        scheduler = self.scheduler
        for state in metrics.GAUGE_STATES:
            metrics.MESSAGES.labels(self.label, state).set(scheduler.message_counts[State(state)])
            metrics.RECIPIENTS.labels(self.label, state).set(scheduler.recipient_counts[State(state)])
        metrics.WORKERS.labels(self.label).set(len(scheduler.workers))
        oldest = next(iter(scheduler.messages.values()), None)
        metrics.OLDEST_AGE.labels(self.label).set(max(0.0, now - oldest.arrival) if oldest else 0.0)

    def _observe_commit(self, stored: int, seconds: float) -> None:
        metrics.COMMIT_DURATION.labels(self.label).observe(seconds)
        if stored:
            metrics.COMMIT_BATCH.labels(self.label).observe(stored)


def _check_fields(message: BusMessage) -> None:
    """Type checks the schemas module leaves to the receiver (nested values); raises SchemaError."""
    if isinstance(message, Result):
        for outcome in message.outcomes:
            if not (isinstance(outcome.recipient, str) and isinstance(outcome.status, str)
                    and isinstance(outcome.code, int) and isinstance(outcome.enhanced, str)
                    and isinstance(outcome.text, str) and isinstance(outcome.remote, str)):
                raise SchemaError("result.outcomes: recipient, status, enhanced, text, remote must be strings "
                                  "and code an integer")
    elif isinstance(message, Heartbeat) and not all(isinstance(job_id, str) for job_id in message.in_flight):
        raise SchemaError("heartbeat.in_flight: expected a list of strings")


def _connection_level(outcome: Outcome | None) -> bool:
    """A deferral that says nothing about one recipient: no server answered, it closed (421), or a
    network/routing problem (RFC 3463 4.4.x). Only these back off a whole destination."""
    if outcome is None:
        return True
    return not outcome.remote or outcome.code == 421 or outcome.enhanced.startswith("4.4.")
