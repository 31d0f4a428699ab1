"""One shard's queue manager without sockets: builds the parts and routes each bus message to its owner.

    Inject        -> inject.py    Injector          store (group commit), answer Stored / InjectRefused
    Heartbeat     -> workers.py   WorkerRegistry    credits and leases, answer HeartbeatAck
    Result        -> workers.py (whose job) -> outcomes.py OutcomeRecorder (retry decisions) -> ledger.py
    AdminRequest  -> admin.py     AdminOps          answer AdminReply ("user_usage": accounts.py)
    Reserve, Release, AuthFailures -> accounts.py AccountCounters   per-user daily counters (durable),
                                                    failed-AUTH counts per client address
    timer         -> maintenance.py Maintainer      promotions, expiry, backoffs, disk space, delay warnings
    dispatcher    -> dispatch.py  Dispatcher        jobs -> Deliver
    DSNs          -> bounces.py   BounceMaker, outbox.py Outbox (forwarding to the owning shard)
    Transfer, drain ops, timer -> drain.py Drain   serving / draining / drained; the queue handed to new owners,
                                                    and the other owned state (handover.py Handover)
Every durable change of a recipient goes through ledger.py; the spool through spoolio.py. The parts know
each other only through the narrow callables given here, and none imports this module.

Loading: `open_spool()` opens the spool and what serving needs (drain state, usage counters, destination
backoffs); `load_queue()` then reads the queued messages in chunks from a snapshot of the spool (spool.py:
SqliteReader) and schedules each chunk as it comes, so shard.py serves (takes new mail, dispatches) while a
large queue is still being read (ARCHITECTURE.md performance notes). Until it is all read, `loaded` is unset
and what needs the whole queue waits for it: `queue list` and `queue flush` are answered once it is read, a
queue id not found is looked up again then, a Transfer waits, a drain does not conclude.

Inputs: the configuration, the shard index, a `Spool`, a clock (`now()` in seconds, a virtual one in tests)
and `send(identity, message)`, the way back to the peer. shard.py gives it a ZeroMQ socket; unit tests give
it a list. Failure modes: a request handler that fails is logged; the caller answers with an Error. A record
found damaged when its body is read for delivery (spoolio.py) is quarantined, logged and forgotten here,
never delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from cluster.bus.schemas import (
    AdminReply,
    AdminRequest,
    AuthFailures,
    BusMessage,
    Error,
    Heartbeat,
    Inject,
    Release,
    Reserve,
    Result,
    Transfer,
)
from cluster.config import Config
from cluster.observability import domain_label
from cluster.queue import metrics
from cluster.queue.accounts import AccountCounters
from cluster.queue.admin import AdminError, AdminOps
from cluster.queue.bounces import BounceMaker
from cluster.queue.deliverability_admin import DeliverabilityOps
from cluster.queue.dispatch import Dispatcher
from cluster.queue.drain import DRAIN_OPS, Drain
from cluster.queue.handover import Handover
from cluster.queue.inject import DiskSpace, Injector
from cluster.queue.ledger import Change, Event, Ledger, copy_recipient
from cluster.queue.maintenance import Maintainer
from cluster.queue.outbox import Outbox
from cluster.queue.outcomes import OutcomeRecorder
from cluster.queue.records import Message, QueueIdFactory, State
from cluster.queue.retry import RetrySchedule
from cluster.queue.scheduler import Scheduler, SchedulerLimits
from cluster.queue.shaping import Shaper
from cluster.queue.spool import LOAD_CHUNK, LoadResult, Quarantined, Spool, SpoolError, SpoolReader
from cluster.queue.spoolio import SpoolIO
from cluster.queue.suppression import Entry, SuppressionList, suppressed_outcome
from cluster.queue.workers import WorkerRegistry

log = logging.getLogger("mtacluster.queue")

READY_ONLY = frozenset({State.READY})

Send = Callable[[bytes, BusMessage], Awaitable[None]]
# The same, for a sender that never waits (shard.py's socket): answers from a callback go out at once.
SendNow = Callable[[bytes, BusMessage], None]
# Usage entries older than 24 hours are deleted from the spool this often (seconds).
PRUNE_INTERVAL = 60.0
# Admin operations that need the whole queue: answered once it is loaded.
WHOLE_QUEUE_OPS = frozenset({"list", "flush"})


class ShardCore:
    def __init__(self, config: Config, index: int, spool: Spool, clock: Callable[[], float], send: Send,
                 epoch: str | None = None, directory: Path | None = None, send_now: SendNow | None = None) -> None:
        self.config = config
        self.index = index
        self.label = str(index)
        self.clock = clock
        self.epoch = epoch or secrets.token_hex(8)
        self.ready = False
        self._send = send
        self._send_now = send_now
        self._tasks: set[asyncio.Task[None]] = set()
        # Injects read in this turn, stored together at the end of the turn (`handle`).
        self._injects: list[tuple[bytes, Inject]] = []
        top = frozenset(d.lower() for d in config.metrics.top_domains)
        self.shaper = Shaper(config.shaping, config.delivery.destination_concurrency,
                             config.delivery.max_recipients_per_transaction,
                             lambda bucket: bucket if bucket.startswith("mx:") else domain_label(bucket, top),
                             config.egress)
        self.scheduler = Scheduler(SchedulerLimits(
            destination_concurrency=config.delivery.destination_concurrency,
            max_recipients=config.delivery.max_recipients_per_transaction,
            lease_time=config.queue.lease_time,
            worker_timeout=config.queue.worker_timeout,
        ), job_prefix=f"{self.epoch[:8]}.", shaper=self.shaper)
        self.io = SpoolIO(spool, self.label, config.queue.commit_batch_max, self._observe_commit,
                          self.scheduler.backoff_journal)
        self.ids = QueueIdFactory(index)
        self.space = DiskSpace(self.label, self.io.free_space)
        self.workers = WorkerRegistry(index, self.epoch, self.scheduler)
        self.dispatcher = Dispatcher(index, self.scheduler, self.io, clock, send, self.epoch,
                                     self.workers.count_duplicates)
        self.outbox = Outbox(config, index, self.io)
        self.bounces = BounceMaker(config, index, self.ids, self.io, self.outbox, self.scheduler.messages.get,
                                   self._schedule, self.spawn)
        self.ledger = Ledger(self.label, self.scheduler, self.io, self.bounces, self.dispatcher.wake)
        ttl = config.suppression.ttl
        self.suppression = SuppressionList(
            Path(config.queue.spool_dir) / f"shard-{index}.suppression.sqlite" if ttl > 0 else None, ttl)
        self.outcomes = OutcomeRecorder(index, self.scheduler, RetrySchedule(config.queue), self.ledger, self.spawn,
                                        self.suppression)
        self.injector = Injector(config, index, self.io, self.ids, self.space, clock, self._schedule_new,
                                 self.dispatcher.expects, self.scheduler.keep_fresh)
        self.admin = AdminOps(self.scheduler, self.ledger, self.io, clock, self.dispatcher.wake, self._identity,
                              DeliverabilityOps(index, config, self.suppression, self.shaper, clock).handlers())
        self.maintainer = Maintainer(self.label, self.scheduler, self.workers, self.bounces, self.space)
        self.accounts = AccountCounters(self.label, self.io.commit, clock)
        self.drain = Drain(config, index, directory, self.scheduler, self.ledger.locks, self.io, self.outbox,
                           self._set_dispatching, self._schedule_new, self.spawn,
                           Handover(index, self.suppression, self.accounts.ledger, self.io.commit), clock)
        self._last_prune = 0.0
        self.quarantined: list[str] = []
        self.io.on_damaged = self._damaged
        # Loading (module docstring): set once every queued message is scheduled.
        self.loaded = asyncio.Event()
        self.queue_total = 0
        self.queue_loaded = 0
        self._reader: SpoolReader | None = None
        metrics.initialise(self.label)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Open the spool and load the whole queue before anything else (tests, tools); shard.py serves between
        `open_spool` and the end of `load_queue` instead."""
        await self.open_spool()
        await self.load_queue()

    async def open_spool(self) -> None:
        """Open the spool and read what serving needs; the queue itself is read by `load_queue`."""
        self._reader = reader = await self.io.open()
        self.queue_total = reader.total
        self.drain.load()
        self.accounts.load(await self.io.load_usage())
        self.scheduler.restore_backoffs(reader.backoffs, self.clock())
        self.space.refresh()

    async def load_queue(self) -> None:
        """Read the queue in chunks (the next one read in the spool's thread while this one is scheduled),
        recover what was in flight at the last stop, and schedule each chunk as it comes."""
        reader = self._reader
        if reader is None:
            raise RuntimeError("open_spool() first")
        started = time.monotonic()
        in_flight = 0
        following: asyncio.Future[tuple[LoadResult, int] | None] | None = None
        try:
            part = await self.io.read_chunk(reader, LOAD_CHUNK)
            while part is not None:
                following = asyncio.ensure_future(self.io.read_chunk(reader, LOAD_CHUNK))
                in_flight += self._schedule_loaded(*part)
                part = await following
        finally:
            if following is not None and not following.done():
                following.cancel()
            self._reader = None
            await self.io.close_reader(reader)
        if in_flight:
            log.warning("shard %d: %d recipients were in flight at the last stop and may be delivered twice",
                        self.index, in_flight)
        self.loaded.set()
        self.dispatcher.wake()
        log.info("shard %d: queue loaded: %d messages in %.1fs", self.index, self.queue_loaded,
                 time.monotonic() - started)

    def _schedule_loaded(self, loaded: LoadResult, in_flight: int) -> int:
        if in_flight:
            metrics.POSSIBLE_DUPLICATES.labels(self.label).inc(in_flight)
        for quarantined in loaded.quarantined:
            log.error("shard %d: quarantined damaged record %s (%s) to %s", self.index, quarantined.queue_id,
                      quarantined.reason, quarantined.path)
            self.quarantined.append(quarantined.queue_id)
        for message in loaded.messages:
            if message.forward_shard >= 0:
                self.outbox.add(message)
            else:
                self.scheduler.add_message(message)
                self.bounces.track(message)
        self.queue_loaded += len(loaded.messages)
        self.dispatcher.wake()
        return in_flight

    def _damaged(self, quarantined: Quarantined) -> None:
        """A record failed its checks when its body was read (spoolio.py): never deliver it, forget it here."""
        where = f"moved aside to {quarantined.path}" if quarantined.path else "left in the spool"
        log.error("%s: damaged record (%s) found when its body was read: not delivered, %s", quarantined.queue_id,
                  quarantined.reason, where)
        self.quarantined.append(quarantined.queue_id)
        self.scheduler.lock(quarantined.queue_id)  # no new job for it until it is forgotten
        self.spawn(self._forget(quarantined.queue_id))

    async def _forget(self, queue_id: str) -> None:
        async with self.ledger.locks.hold([queue_id]):
            for job in [j for j in self.scheduler.jobs.values() if j.queue_id == queue_id]:
                self.scheduler.finish_job(job.job_id)
            self.scheduler.remove_message(queue_id)
            self.outbox.messages.pop(queue_id, None)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request handler in the background (awaited, within a grace time, on stop)."""
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("shard %d: request handler failed", self.index, exc_info=task.exception())

    async def idle(self) -> None:
        """Wait until no request handler runs and no commit waits any more (including those started meanwhile)."""
        while self._tasks or self._injects or not self.io.idle.is_set():
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            elif self._injects:
                await asyncio.sleep(0)  # they are taken at the end of this turn
            else:
                await self.io.idle.wait()

    async def settle(self, grace: float) -> None:
        """Let the requests being handled (and the messages being stored) finish (up to `grace` seconds), then
        cancel the rest."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), grace)
        leftovers = list(self._tasks)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    async def close(self) -> None:
        await self.io.close()
        self.suppression.close()

    # -- routing ------------------------------------------------------------------------------------------

    async def handle(self, identity: bytes, message: BusMessage) -> None:
        if isinstance(message, Inject):
            # Every Inject read in this turn goes into one batch, stored at the end of the turn (inject.py).
            self._injects.append((identity, message))
            if len(self._injects) == 1:
                asyncio.get_running_loop().call_soon(self._inject_turn)
        elif isinstance(message, Heartbeat):
            ack = self.workers.on_heartbeat(identity, message, self.clock())
            await self._send(identity, dataclasses.replace(ack, state=self.drain.state))
            self.dispatcher.wake()
        elif isinstance(message, Result):
            now = self.clock()
            job = self.workers.on_result(identity, message, now)
            self.dispatcher.wake()
            if job is not None:
                self.outcomes.record(job, message.outcomes, now)
            else:
                self.ledger.late_result(message.job_id, message.outcomes, now)
        elif isinstance(message, AdminRequest):
            self.spawn(self._admin(identity, message))
        elif isinstance(message, Transfer):
            self.spawn(self._transfer(identity, message))
        elif isinstance(message, Reserve | Release | AuthFailures):
            self.spawn(self._accounts(identity, message))
        else:
            await self._send(identity, Error(f"a shard does not accept {message.TYPE!r} messages"))

    def _inject_turn(self) -> None:
        taken, self._injects = self._injects, []
        self.injector.begin_many([inject for _, inject in taken],
                                 lambda position, answer: self._answer(taken[position][0], answer))

    def _answer(self, identity: bytes, answer: BusMessage) -> None:
        """Send an answer from a callback: at once through `send_now`, else from a task."""
        if self._send_now is not None:
            self._send_now(identity, answer)
        else:
            self.spawn(self._send_later(identity, answer))

    async def _send_later(self, identity: bytes, answer: BusMessage) -> None:
        await self._send(identity, answer)

    async def _transfer(self, identity: bytes, transfer: Transfer) -> None:
        await self.loaded.wait()  # a resend of a message not loaded yet must be recognised (drain.py)
        await self._send(identity, await self.drain.receive(transfer, self.injector.short_of_space))

    async def _accounts(self, identity: bytes, message: BusMessage) -> None:
        await self._send(identity, await self.accounts.handle(message))

    async def _admin(self, identity: bytes, request: AdminRequest) -> None:
        if request.op in WHOLE_QUEUE_OPS:
            await self.loaded.wait()  # about the whole queue: a restart reads it in the background
        try:
            try:
                data = await self._admin_op(request)
            except AdminError as exc:
                if not exc.not_found or self.loaded.is_set():
                    raise
                await self.loaded.wait()  # perhaps not read yet: look again once the queue is
                data = await self._admin_op(request)
        except AdminError as exc:
            data = {"not_found": True} if exc.not_found else None
            await self._send(identity, AdminReply(request.req, False, data, str(exc)))
            return
        except (ValueError, TypeError) as exc:
            await self._send(identity, AdminReply(request.req, False, None, str(exc)))
            return
        except SpoolError as exc:
            await self._send(identity, AdminReply(request.req, False, None, f"spool error: {exc}"))
            return
        await self._send(identity, AdminReply(request.req, True, data, ""))

    async def _admin_op(self, request: AdminRequest) -> Any:
        if request.op in DRAIN_OPS:
            return await self.drain.handle_admin(request.op, request.args)
        if request.op == "user_usage":
            return self.accounts.usage(str(request.args.get("user", "")))
        return await self.admin.handle(request.op, request.args)

    def tick(self, monotonic: float, expire: bool = True) -> None:
        """Periodic work; `expire=False` skips judging workers silent (frames are still waiting to be read)."""
        if self.maintainer.tick(self.clock(), monotonic, expire):
            self.dispatcher.wake()
        metrics.SUPPRESSION_SIZE.labels(self.label).set(len(self.suppression))
        if self.loaded.is_set():  # a drain is over only once the whole queue was read and moved
            self.drain.tick()
        if monotonic - self._last_prune >= PRUNE_INTERVAL:
            self._last_prune = monotonic
            self.spawn(self.accounts.prune())

    async def idle_outcomes(self, grace: float) -> None:
        """Wait (up to `grace` seconds) for the outcomes being recorded to be committed."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)

    # -- glue between the parts ---------------------------------------------------------------------------

    def _schedule_new(self, message: Message) -> None:
        now = self.clock()
        suppressed = {r.index: entry for r in message.recipients
                      if self.suppression.enabled and (entry := self.suppression.lookup(r.address, now))}
        if suppressed:
            # Locked before the dispatcher can see it: the suppressed recipients fail without an attempt.
            self.scheduler.lock(message.queue_id)
        self.scheduler.add_message(message)
        self.bounces.track(message)
        if suppressed:
            self.spawn(self._fail_suppressed(message.queue_id, suppressed, now))
        self.dispatcher.wake()

    async def _fail_suppressed(self, queue_id: str, suppressed: dict[int, Entry], now: float) -> None:
        def decide(message: Message) -> list[Change]:
            return [Change(copy_recipient(message.recipients[i], State.FAILED, last=suppressed_outcome(entry)),
                           READY_ONLY, Event.BOUNCED, bounce=True) for i, entry in suppressed.items()]

        try:
            await self.ledger.apply([queue_id], decide, now)
        except SpoolError as exc:
            log.error("shard %d: cannot fail the suppressed recipients of %s: %s", self.index, queue_id, exc)
            self.scheduler.unlock(queue_id)
            self.dispatcher.wake()
            return
        metrics.SUPPRESSED.labels(self.label).inc(len(suppressed))
        for entry in suppressed.values():
            log.info("%s: to=<%s>, status=bounced (suppressed: %s since %s)", queue_id, entry.address,
                     entry.category, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.since)))

    def _schedule(self, message: Message) -> None:
        self.scheduler.add_message(message)
        self.dispatcher.wake()

    def _identity(self) -> dict[str, Any]:
        return {"shard": self.index, "epoch": self.epoch, "ready": self.ready, "state": self.drain.state}

    def _set_dispatching(self, enabled: bool) -> None:
        self.dispatcher.enabled = enabled
        self.dispatcher.wake()

    def _observe_commit(self, stored: int, seconds: float) -> None:
        duration, batch = metrics.commit_children(self.label)
        duration.observe(seconds)
        if stored:
            batch.observe(stored)
