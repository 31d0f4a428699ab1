"""The workers of one shard, as the shard sees them: heartbeats, Results, and expiry of silent workers.

Inputs: Heartbeat and Result messages (cluster/bus/schemas.py: credit-based flow control with heartbeats and
leases) and the time. Outputs: the HeartbeatAck to send, the finished Job a Result belongs to (its outcomes
are then recorded by outcomes.py), jobs taken back from workers that no longer hold them or went silent.
The bookkeeping itself (credits and job ownership from facts, leases, incarnations, Deliver numbering) is the
scheduler's (`Scheduler.heartbeat`, `seen`, `take_result`, `expire`); this module is the seam between it and
the bus, and counts the scheduler's possible duplicates in mtacluster_queue_possible_duplicates_total.
Failure modes: a Result for a job unknown to this shard (finished already, or from before a restart) is logged
and ignored. A Result for a job taken back from a silent worker is reconciled (Scheduler.take_result): it
decides the recipients not handed out again, and a delivery of one that was is logged as delivered twice
(already counted as a possible duplicate when it was handed out again).
"""

from __future__ import annotations

import logging

from cluster.bus.schemas import Heartbeat, HeartbeatAck, OutcomeKind, Result
from cluster.queue import metrics
from cluster.queue.scheduler import Job, Scheduler

log = logging.getLogger("mtacluster.queue")


class WorkerRegistry:
    def __init__(self, index: int, epoch: str, scheduler: Scheduler) -> None:
        self.index = index
        self.label = str(index)
        self.epoch = epoch
        self.scheduler = scheduler
        self._duplicates_counted = 0

    def on_heartbeat(self, identity: bytes, heartbeat: Heartbeat, now: float) -> HeartbeatAck:
        seen = heartbeat.seen if heartbeat.seen_epoch == self.epoch else 0
        outcome = self.scheduler.heartbeat(heartbeat.worker, identity, heartbeat.free, heartbeat.in_flight, now,
                                           seen, heartbeat.incarnation, heartbeat.sent or None, heartbeat.finished)
        if outcome.registered:
            log.info("shard %d: worker %s registered (incarnation %d, %d free, holding %d jobs)", self.index,
                     heartbeat.worker, outcome.incarnation, heartbeat.free, len(heartbeat.in_flight))
        if outcome.returned:
            metrics.LEASES_EXPIRED.labels(self.label).inc(len(outcome.returned))
            log.warning("shard %d: worker %s no longer holds %d jobs; they are ready again", self.index,
                        heartbeat.worker, len(outcome.returned))
        if outcome.adopted:
            log.info("shard %d: worker %s still holds %d jobs taken back while it was silent; they are its own "
                     "again", self.index, heartbeat.worker, len(outcome.adopted))
        return HeartbeatAck(self.index, self.epoch, outcome.incarnation, outcome.last_seq, outcome.revoked,
                            outcome.resend)

    def on_result(self, identity: bytes, result: Result, now: float) -> Job | None:
        """The job whose recipients this Result decides (taken out of flight at once, its credit returned), or
        None. A Result for a job taken back earlier decides only the recipients not handed out again."""
        self.scheduler.seen(result.worker, identity, now)
        decision = self.scheduler.take_result(result.job_id, result.worker)
        if decision is None:
            log.info("shard %d: result for unknown or finished job %s ignored", self.index, result.job_id)
            return None
        job = decision.job
        if decision.stale:
            message = self.scheduler.messages.get(job.queue_id)
            delivered = {o.recipient.lower() for o in result.outcomes if o.kind == OutcomeKind.DELIVERED}
            twice = [] if message is None else [message.recipients[i].address for i in decision.duplicates
                                                if message.recipients[i].address.lower() in delivered]
            log.warning("shard %d: late result for job %s (queue_id=%s) taken back while worker %s was silent: it "
                        "decides %d recipients%s", self.index, job.job_id, job.queue_id, result.worker,
                        len(job.indices), f"; delivered twice: {', '.join(twice)}" if twice else "")
            if not job.indices:
                return None
        return job

    def count_duplicates(self) -> None:
        """Add the scheduler's new possible duplicates to mtacluster_queue_possible_duplicates_total."""
        total = self.scheduler.possible_duplicates
        if total > self._duplicates_counted:
            metrics.POSSIBLE_DUPLICATES.labels(self.label).inc(total - self._duplicates_counted)
            self._duplicates_counted = total

    def expire(self, now: float) -> int:
        """Take back jobs of silent workers and expired leases; returns how many.

        Call it only once every message waiting on the socket was read (shard.py): silence is judged on what
        the workers sent, and a heartbeat or Result still unread must not count as silence."""
        returned = self.scheduler.expire(now)
        if returned:
            metrics.LEASES_EXPIRED.labels(self.label).inc(len(returned))
            log.warning("shard %d: took back %d jobs from silent workers or expired leases", self.index,
                        len(returned))
        return len(returned)
