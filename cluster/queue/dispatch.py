"""Dispatch of one shard: turn ready recipients into jobs for workers with credits, and send them.

Inputs: the scheduler (ready queues, worker credits), the spool (`SpoolIO`), a `send(identity, message)`
callable (the shard's socket). Outputs: Deliver messages. Woken by `wake()` whenever something may have
become dispatchable (new mail, a Result, a heartbeat, a promotion, an unlock).
Durability (ARCHITECTURE.md contract 2): a job's recipients are marked in flight in the spool before its
Deliver is sent, so after a crash they are queued again and counted as possible duplicates.
Failure modes: when the marks cannot be committed, the jobs go back to ready and nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cluster.bus.schemas import BusMessage, Deliver
from cluster.queue.records import RecipientUpdate
from cluster.queue.scheduler import Job, Scheduler
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO

log = logging.getLogger("mtacluster.queue")


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
        marks = [RecipientUpdate.of(job.queue_id, self.scheduler.messages[job.queue_id].recipients[i])
                 for job in jobs for i in job.indices]
        try:
            await self.io.commit(Batch(updates=marks))
            bodies = await self.io.read_bodies({job.queue_id for job in jobs})
        except SpoolError as exc:
            log.error("shard %d: cannot mark jobs in flight: %s", self.index, exc)
            for job in jobs:
                self.scheduler.return_job(job.job_id)
            return 0
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
                                                  message.client.get("pool", ""), max_deliveries, job.source))
        self.scheduler.note_sent(job)
        return 1
