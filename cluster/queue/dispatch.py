"""Dispatch of one shard: turn ready recipients into jobs for workers with credits, and send them.

Inputs: the scheduler (ready queues, worker credits), the spool (`SpoolIO`), a `send(identity, message)`
callable (the shard's socket). Outputs: Deliver messages. Woken by `wake()` whenever something may have
become dispatchable (new mail, a Result, a heartbeat, a promotion, an unlock).
Durability (ARCHITECTURE.md contract 2): a job's recipients are marked in flight in the spool before its
Deliver is sent, so after a crash they are queued again and counted as possible duplicates. A new message
that will be dispatched at once (`expects`: workers have spare credits, its destinations have room) is stored
with its recipients in flight already, in the transaction that stores it, and its body is kept from the
Inject (`Scheduler.keep_fresh`): its first Deliver then costs no transaction and no read (one transaction per
message on the normal path, issue 12). Should it wait after all, a crash counts it as a possible duplicate
though it was never sent, and a clean stop writes it back as ready (`unmark`).
Failure modes: when the marks cannot be committed, the jobs that needed them go back to ready and are not sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cluster.bus.schemas import BusMessage, Deliver
from cluster.queue.records import Message, RecipientUpdate, State
from cluster.queue.scheduler import Job, Scheduler
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO

log = logging.getLogger("mtacluster.queue")

# Bodies kept from their Inject for the first Deliver, at most this many bytes in all (beyond it, new mail is
# stored ready and its body read back at dispatch, as any other).
FRESH_BYTES_MAX = 32 * 1024 * 1024


class Dispatcher:
    def __init__(self, index: int, scheduler: Scheduler, io: SpoolIO, clock: Callable[[], float],
                 send: Callable[[bytes, BusMessage], Awaitable[None]], epoch: str = "",
                 sent: Callable[[], None] = lambda: None) -> None:
        self.index = index
        self.epoch = epoch
        # Called after each batch of Delivers (the shard counts possible duplicates there).
        self._sent = sent
        # False once the shard is stopping: nothing more is dispatched (up stops shards before workers).
        self.enabled = True
        self.scheduler = scheduler
        self.io = io
        self.clock = clock
        self._send = send
        self._wake = asyncio.Event()
        self._running = False

    def wake(self) -> None:
        self._wake.set()

    @property
    def idle(self) -> bool:
        """Not dispatching, and not woken: what could be dispatched has been."""
        return not self._running and not self._wake.is_set()

    def expects(self, message: Message) -> bool:
        """Whether `message`, about to be stored, will be dispatched as soon as it is: store it in flight."""
        if not self.enabled or self.scheduler.fresh_bytes + message.size > FRESH_BYTES_MAX:
            return False
        return self.scheduler.has_room({r.domain for r in message.recipients}, self.clock())

    async def unmark(self) -> None:
        """On a clean stop: messages stored in flight and never dispatched are written back as ready, so the
        next start does not count them as possible duplicates."""
        fresh = list(self.scheduler.fresh)
        updates = [RecipientUpdate.of(queue_id, r) for queue_id in fresh
                   if (message := self.scheduler.messages.get(queue_id)) is not None
                   for r in message.recipients if r.state is State.READY]
        for queue_id in fresh:
            self.scheduler.take_fresh(queue_id)
        if updates:
            try:
                await self.io.commit(Batch(updates=updates))
            except SpoolError as exc:
                log.error("shard %d: cannot write %d recipients back as ready: %s", self.index, len(updates), exc)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._running = True
            try:
                await self.dispatch_once()
            finally:
                self._running = False

    async def dispatch_once(self) -> int:
        """Make and send the jobs workers have credits for now; returns how many were sent."""
        if not self.enabled:
            return 0
        jobs = self.scheduler.dispatch(self.clock())
        if not jobs:
            return 0
        bodies: dict[str, bytes] = {}
        stored_out: set[str] = set()  # messages stored in flight: none of their jobs needs a mark
        for job in jobs:
            body = self.scheduler.take_fresh(job.queue_id)
            if body is not None:
                bodies[job.queue_id] = body
                stored_out.add(job.queue_id)
        marked = [job for job in jobs if job.queue_id not in stored_out]
        if marked:
            marks = [RecipientUpdate.of(job.queue_id, self.scheduler.messages[job.queue_id].recipients[i])
                     for job in marked for i in job.indices]
            try:
                await self.io.commit(Batch(updates=marks))
                bodies.update(await self.io.read_bodies({job.queue_id for job in marked}))
            except SpoolError as exc:
                log.error("shard %d: cannot mark jobs in flight: %s", self.index, exc)
                for job in marked:
                    self.scheduler.return_job(job.job_id)
                jobs = [job for job in jobs if job.queue_id in stored_out]
        sent = 0
        for job in jobs:
            sent += await self._send_job(job, bodies.get(job.queue_id))
        self._sent()
        self.wake()
        return sent

    async def _send_job(self, job: Job, body: bytes | None) -> int:
        worker = self.scheduler.workers.get(job.worker)
        if body is None or worker is None or job.job_id not in self.scheduler.jobs:
            self.scheduler.return_job(job.job_id)
            return 0
        message = self.scheduler.messages[job.queue_id]
        recipients = [message.recipients[i].address for i in job.indices]
        seq = self.scheduler.next_seq(job)
        shaper = self.scheduler.shaper
        max_deliveries = shaper.limits(job.domain).max_deliveries_per_connection if shaper is not None else 0
        await self._send(worker.identity, Deliver(job.job_id, job.queue_id, message.sender, recipients, job.domain,
                                                  body, job.attempt, seq, self.epoch, job.incarnation,
                                                  message.pool, max_deliveries, job.source))
        self.scheduler.note_sent(job)
        return 1
