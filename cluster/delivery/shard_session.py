"""A worker's view of one queue shard (pure: no I/O, time comes in as `now`): the worker half of the dispatch
protocol in cluster/bus/schemas.py.

Inputs: Deliver and HeartbeatAck messages from the shard, the worker's own job starts and finishes, and the
time. Outputs: the Heartbeat to send, whether a received job may start now, the jobs to drop (revoked by the
shard before they started) and the Results to send again.

What it keeps:
- the shard instance (`epoch`), our registration there (`incarnation`) and `seen`, the highest Deliver seq
  received or acked as sent in that registration (a new epoch or incarnation starts counting again);
- jobs received and not started (`waiting`), jobs running (`running`), and finished jobs whose Result was sent
  (`results`, kept until the shard revokes them: a Result sent into a network cut is lost, and the shard then
  asks for it again with `resend`).

Fencing (ARCHITECTURE.md contract 2): when no ack came for `fence_after` seconds, the shard may have taken our
jobs back and handed them to another worker, so no job from it starts until an ack arrives; that ack revokes
the jobs that are no longer ours. A job already running when the cut began is finished and reported; the
shard reconciles it and counts a duplicate if it was handed out again meanwhile.
Failure modes: none raised; a repeated Deliver for a job we hold is ignored (`accept` returns False).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.bus.schemas import Deliver, Heartbeat, HeartbeatAck


@dataclass
class AckActions:
    """What the worker does after an ack: announce itself again (shard restarted), drop jobs that had not
    started, send Results again."""

    restarted: bool = False
    dropped: list[str] = field(default_factory=list)
    resend: list[bytes] = field(default_factory=list)


class ShardSession:
    def __init__(self, concurrency: int, fence_after: float) -> None:
        self.concurrency = concurrency
        self.fence_after = fence_after
        self.epoch: str | None = None
        self.incarnation = 0
        self.seen = 0
        self.last_ack = float("-inf")
        self.waiting: dict[str, Deliver] = {}
        self.running: set[str] = set()
        self.results: dict[str, bytes] = {}

    # -- from the shard -----------------------------------------------------------------------------------

    def on_ack(self, ack: HeartbeatAck, now: float) -> AckActions:
        actions = AckActions()
        self.last_ack = now
        if ack.shard_epoch != self.epoch:
            actions.restarted = self.epoch is not None
            self.epoch = ack.shard_epoch
            self.incarnation = -1
        if ack.incarnation != self.incarnation:
            self.incarnation = ack.incarnation
            self.seen = 0
        # Every Deliver up to last_seq was sent before this ack, on the same ordered pipe: not received means lost.
        self.seen = max(self.seen, ack.last_seq)
        for job_id in ack.revoked:
            self.results.pop(job_id, None)
            if self.waiting.pop(job_id, None) is not None:
                actions.dropped.append(job_id)
        actions.resend = [self.results[job_id] for job_id in ack.resend if job_id in self.results]
        return actions

    def accept(self, deliver: Deliver) -> bool:
        """Count a Deliver as seen; True when it is a new job (now waiting to start)."""
        if deliver.epoch and deliver.epoch != self.epoch:
            self.epoch, self.incarnation, self.seen = deliver.epoch, deliver.incarnation, 0
        elif deliver.incarnation != self.incarnation:
            self.incarnation, self.seen = deliver.incarnation, 0
        self.seen = max(self.seen, deliver.seq)
        job_id = deliver.job_id
        if job_id in self.waiting or job_id in self.running or job_id in self.results:
            return False
        self.waiting[job_id] = deliver
        return True

    # -- our own jobs -------------------------------------------------------------------------------------

    def fenced(self, now: float) -> bool:
        """No ack for `fence_after` seconds: our leases may be gone, so start nothing from this shard."""
        return now - self.last_ack >= self.fence_after

    def start(self, job_id: str) -> bool:
        """Move a waiting job to running; False when it was revoked meanwhile (it must not run)."""
        if self.waiting.pop(job_id, None) is None:
            return False
        self.running.add(job_id)
        return True

    def finish(self, job_id: str, result: bytes) -> None:
        """The job ended; its encoded Result is kept until the shard revokes the job."""
        self.running.discard(job_id)
        self.results[job_id] = result

    def abandon(self, job_id: str) -> None:
        """Forget a job that will not finish here (stopping): not listed any more, so the shard takes it back."""
        self.waiting.pop(job_id, None)
        self.running.discard(job_id)

    def heartbeat(self, worker: str, now: float) -> Heartbeat:
        held = [*self.running, *self.waiting]
        return Heartbeat(worker=worker, free=max(0, self.concurrency - len(held)), in_flight=held, seen=self.seen,
                         seen_epoch=self.epoch or "", incarnation=self.incarnation, sent=now,
                         finished=list(self.results))
