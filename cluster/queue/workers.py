"""The workers of one shard, as the shard sees them: heartbeats, Results, and expiry of silent workers.

Inputs: Heartbeat and Result messages (cluster/bus/schemas.py: credit-based flow control with heartbeats and
leases) and the time. Outputs: the HeartbeatAck to send, the finished Job a Result belongs to (its outcomes
are then recorded by outcomes.py), jobs taken back from workers that no longer hold them or went silent.
The bookkeeping itself (credits, leases, Deliver numbering) is the scheduler's (`Scheduler.heartbeat`,
`seen`, `finish_job`, `expire`); this module is the seam between it and the bus.
Failure modes: a Result for a job the shard no longer assigns to that worker (taken back, reassigned, or from
before a restart) is logged and ignored; its recipients are handled by whoever holds them now.
"""

from __future__ import annotations

import logging

from cluster.bus.schemas import Heartbeat, HeartbeatAck, Result
from cluster.queue import metrics
from cluster.queue.scheduler import Job, Scheduler

log = logging.getLogger("mtacluster.queue")


class WorkerRegistry:
    def __init__(self, index: int, epoch: str, scheduler: Scheduler) -> None:
        self.index = index
        self.label = str(index)
        self.epoch = epoch
        self.scheduler = scheduler

    def on_heartbeat(self, identity: bytes, heartbeat: Heartbeat, now: float) -> HeartbeatAck:
        seen = heartbeat.seen if heartbeat.seen_epoch == self.epoch else 0
        returned = self.scheduler.heartbeat(heartbeat.worker, identity, heartbeat.free, heartbeat.in_flight, now,
                                            seen)
        if returned:
            metrics.LEASES_EXPIRED.labels(self.label).inc(len(returned))
            log.warning("shard %d: worker %s no longer holds %d jobs; they are ready again", self.index,
                        heartbeat.worker, len(returned))
        return HeartbeatAck(self.index, self.epoch)

    def on_result(self, identity: bytes, result: Result, now: float) -> Job | None:
        """The job this Result finishes (taken out of flight at once, its credit returned), or None."""
        self.scheduler.seen(result.worker, identity, now)
        pending = self.scheduler.jobs.get(result.job_id)
        if pending is None or pending.worker != result.worker:
            log.info("shard %d: result for unknown or reassigned job %s ignored", self.index, result.job_id)
            return None
        return self.scheduler.finish_job(result.job_id)

    def expire(self, now: float) -> int:
        """Take back jobs of silent workers and expired leases; returns how many."""
        returned = self.scheduler.expire(now)
        if returned:
            metrics.LEASES_EXPIRED.labels(self.label).inc(len(returned))
            log.warning("shard %d: took back %d jobs from silent workers or expired leases", self.index,
                        len(returned))
        return len(returned)
