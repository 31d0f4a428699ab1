"""The worker's view of one shard: seen counting per (epoch, incarnation), fencing, revocation, lost Results."""

from __future__ import annotations

from cluster.bus.schemas import Deliver, HeartbeatAck
from cluster.delivery.shard_session import ShardSession


def deliver(job_id: str, seq: int, epoch: str = "e1", incarnation: int = 1) -> Deliver:
    return Deliver(job_id, "Q", "s@x.test", ["r@y.test"], "y.test", b"", 1, seq, epoch, incarnation)


def test_seen_counts_deliveries_and_acked_sends_within_one_registration() -> None:
    session = ShardSession(concurrency=4, fence_after=1.0)
    session.on_ack(HeartbeatAck(0, "e1", incarnation=1), now=0)
    assert session.accept(deliver("a", 1)) and session.seen == 1
    # Deliver 2 was lost in a network cut: the ack says it was sent before, so it counts as seen (and missing).
    session.on_ack(HeartbeatAck(0, "e1", incarnation=1, last_seq=2), now=1)
    beat = session.heartbeat("w", now=1)
    assert (beat.seen, beat.incarnation, beat.seen_epoch, beat.in_flight) == (2, 1, "e1", ["a"])
    # Re-registered (we were silent too long): counting starts again, and the old count is not reported.
    session.on_ack(HeartbeatAck(0, "e1", incarnation=2, last_seq=0), now=2)
    assert session.heartbeat("w", now=2).seen == 0
    assert session.accept(deliver("b", 1, incarnation=2)) and session.seen == 1
    # A restarted shard (new epoch) is noticed, and counting starts again.
    actions = session.on_ack(HeartbeatAck(0, "e2", incarnation=1), now=3)
    assert actions.restarted and session.seen == 0


def test_a_repeated_deliver_is_not_a_new_job() -> None:
    session = ShardSession(concurrency=4, fence_after=1.0)
    assert session.accept(deliver("a", 1))
    assert not session.accept(deliver("a", 1))
    assert session.start("a") and not session.accept(deliver("a", 1))


def test_no_job_starts_while_fenced_and_revoked_jobs_never_start() -> None:
    session = ShardSession(concurrency=4, fence_after=1.0)
    session.on_ack(HeartbeatAck(0, "e1", incarnation=1), now=0)
    session.accept(deliver("a", 1))
    session.accept(deliver("b", 2))
    assert not session.fenced(now=0.9)
    assert session.fenced(now=1.0)  # no ack for fence_after: the shard may have handed our jobs out again
    actions = session.on_ack(HeartbeatAck(0, "e1", incarnation=2, revoked=["a"]), now=5)
    assert actions.dropped == ["a"] and not session.fenced(now=5)
    assert not session.start("a") and session.start("b")


def test_results_are_kept_until_revoked_and_sent_again_when_asked() -> None:
    session = ShardSession(concurrency=2, fence_after=1.0)
    session.on_ack(HeartbeatAck(0, "e1", incarnation=1), now=0)
    session.accept(deliver("a", 1))
    session.start("a")
    assert session.heartbeat("w", now=0).free == 1
    session.finish("a", b"result-a")
    beat = session.heartbeat("w", now=0.5)
    assert beat.finished == ["a"] and beat.in_flight == [] and beat.free == 2
    assert session.on_ack(HeartbeatAck(0, "e1", incarnation=1, resend=["a"]), now=1).resend == [b"result-a"]
    session.on_ack(HeartbeatAck(0, "e1", incarnation=1, revoked=["a"]), now=2)
    assert session.heartbeat("w", now=2).finished == []


def test_abandoned_jobs_are_no_longer_listed() -> None:
    session = ShardSession(concurrency=2, fence_after=1.0)
    session.accept(deliver("a", 1))
    session.abandon("a")
    assert session.heartbeat("w", now=0).in_flight == [] and session.seen == 1
