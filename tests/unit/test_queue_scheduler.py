"""The scheduler with a virtual clock: round robin, destination concurrency, leases, worker timeout, backoff."""

from __future__ import annotations

from collections import Counter

import pytest

from cluster.queue.records import State
from cluster.queue.scheduler import Scheduler, SchedulerLimits
from tests.support.scheduling import queued_message

LIMITS = SchedulerLimits(destination_concurrency=2, max_recipients=3, lease_time=60, worker_timeout=10)


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(LIMITS)


def test_jobs_group_one_message_per_domain_and_cap_recipients(scheduler: Scheduler) -> None:
    scheduler.add_message(queued_message("Q1", "a@x.test", "b@X.test", "c@y.test", "d@x.test", "e@x.test"))
    scheduler.heartbeat("w", b"id", 10, [], now=0)
    jobs = scheduler.dispatch(now=0)
    shapes = sorted((job.domain, tuple(job.indices)) for job in jobs)
    assert shapes == [("x.test", (0, 1, 3)), ("x.test", (4,)), ("y.test", (2,))]
    assert scheduler.recipient_counts[State.IN_FLIGHT] == 5
    assert scheduler.message_counts == Counter({State.IN_FLIGHT: 1})
    assert scheduler.workers["w"].credits == 7


def test_round_robin_across_destinations_and_concurrency_cap(scheduler: Scheduler) -> None:
    for i in range(5):
        scheduler.add_message(queued_message(f"A{i}", f"r{i}@busy.test"))
    scheduler.add_message(queued_message("B0", "r@quiet.test"))
    scheduler.heartbeat("w", b"id", 100, [], now=0)
    jobs = scheduler.dispatch(now=0)
    assert [j.domain for j in jobs].count("busy.test") == 2  # destination_concurrency
    assert "quiet.test" in [j.domain for j in jobs[:2]]  # not starved behind busy.test
    assert scheduler.dispatch(now=0) == []
    scheduler.finish_job(jobs[0].job_id if jobs[0].domain == "busy.test" else jobs[1].job_id)
    assert [j.domain for j in scheduler.dispatch(now=0)] == ["busy.test"]


def test_credits_limit_dispatch_and_results_return_them(scheduler: Scheduler) -> None:
    for i in range(4):
        scheduler.add_message(queued_message(f"Q{i}", f"r@d{i}.test"))
    scheduler.heartbeat("w", b"id", 2, [], now=0)
    first = scheduler.dispatch(now=0)
    assert len(first) == 2 and scheduler.dispatch(now=0) == []
    scheduler.heartbeat("w", b"id", 0, [j.job_id for j in first], now=1)  # holds both, no slot free
    assert scheduler.dispatch(now=1) == []
    scheduler.finish_job(first[0].job_id)  # its Result: one credit back
    assert len(scheduler.dispatch(now=1)) == 1
    scheduler.finish_job(first[0].job_id)  # the same job again (a late or repeated Result): nothing back
    assert scheduler.dispatch(now=1) == []


def test_expired_lease_returns_job_to_ready(scheduler: Scheduler) -> None:
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    for t in range(5, 60, 5):  # the worker keeps beating and listing the job: the lease is renewed
        assert scheduler.heartbeat("w", b"id", 5, [job.job_id], now=t).returned == []
        assert scheduler.expire(now=t) == []
    assert [j.job_id for j in scheduler.expire(now=55 + 9 + LIMITS.lease_time)] == [job.job_id]
    assert scheduler.messages["Q"].recipients[0].state is State.READY
    assert scheduler.leases_expired == 1


def test_lease_runs_out_without_renewal(scheduler: Scheduler) -> None:
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    scheduler.workers["w"].last_seen = 1000  # a worker that beats but is stuck on the job
    assert scheduler.expire(now=59) == []
    assert [j.job_id for j in scheduler.expire(now=60)] == [job.job_id]


def test_silent_worker_is_forgotten_and_its_jobs_return(scheduler: Scheduler) -> None:
    scheduler.add_message(queued_message("Q", "r@x.test", "s@y.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    assert len(scheduler.dispatch(now=0)) == 2
    assert scheduler.expire(now=9.9) == []
    assert len(scheduler.expire(now=10)) == 2
    assert "w" not in scheduler.workers
    assert scheduler.recipient_counts[State.READY] == 2 and scheduler.recipient_counts[State.IN_FLIGHT] == 0


def test_job_missing_from_heartbeat_only_once_the_worker_saw_its_deliver(scheduler: Scheduler) -> None:
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    (job,) = scheduler.dispatch(now=1)
    incarnation = scheduler.workers["w"].incarnation
    assert scheduler.heartbeat("w", b"id", 5, [], now=1.5, incarnation=incarnation).returned == []  # not sent yet
    seq = scheduler.next_seq(job)
    assert seq == 1
    # However late it arrives, a heartbeat sent before the Deliver reached the worker takes nothing back.
    assert scheduler.heartbeat("w", b"id", 5, [], now=5, seen=seq - 1, incarnation=incarnation).returned == []
    assert scheduler.workers["w"].credits == 4  # the job on the wire will take one of the 5 free slots
    assert scheduler.heartbeat("w", b"id", 4, [job.job_id], now=6, seen=seq, incarnation=incarnation).returned == []
    returned = scheduler.heartbeat("w", b"id", 5, [], now=7, seen=seq, incarnation=incarnation).returned
    assert [j.job_id for j in returned] == [job.job_id]
    assert scheduler.workers["w"].credits == 5  # no Result will come for it: the credit is back


def test_deferred_recipients_become_ready_at_their_time(scheduler: Scheduler) -> None:
    message = queued_message("Q", "r@x.test")
    scheduler.add_message(message)
    scheduler.set_state(message, message.recipients[0], State.DEFERRED, 300)
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    assert scheduler.dispatch(now=0) == []
    assert scheduler.promote_due(now=299) == 0
    assert scheduler.next_deferred_time() == 300
    assert scheduler.promote_due(now=300) == 1
    assert len(scheduler.dispatch(now=300)) == 1


def test_held_recipients_are_not_dispatched(scheduler: Scheduler) -> None:
    message = queued_message("Q", "r@x.test")
    scheduler.add_message(message)
    scheduler.set_state(message, message.recipients[0], State.HELD)
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    assert scheduler.dispatch(now=0) == []
    assert scheduler.message_counts == Counter({State.HELD: 1})


def test_destination_backoff_after_repeated_deferrals(scheduler: Scheduler) -> None:
    assert not scheduler.note_destination("x.test", True, now=0, backoff=100)
    assert not scheduler.note_destination("x.test", True, now=0, backoff=100)
    assert scheduler.note_destination("x.test", True, now=0, backoff=100)
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.add_message(queued_message("P", "r@other.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    assert [j.domain for j in scheduler.dispatch(now=50)] == ["other.test"]
    assert not scheduler.end_backoffs(now=99)
    assert scheduler.end_backoffs(now=100) and not scheduler.backoff_until
    assert [j.domain for j in scheduler.dispatch(now=100)] == ["x.test"]
    scheduler.note_destination("x.test", False, now=101, backoff=100)
    assert "x.test" not in scheduler.backoff_until


def test_removing_a_message_keeps_counters_exact(scheduler: Scheduler) -> None:
    message = queued_message("Q", "a@x.test", "b@y.test")
    scheduler.add_message(message)
    scheduler.set_state(message, message.recipients[0], State.DELIVERED)
    assert scheduler.recipient_counts[State.READY] == 1
    scheduler.remove_message("Q")
    assert +scheduler.recipient_counts == Counter() and +scheduler.message_counts == Counter()
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    assert scheduler.dispatch(now=0) == []


def test_counts_stay_exact_for_single_and_multi_recipient_messages_and_memory_is_given_back(
        scheduler: Scheduler) -> None:
    """One-recipient messages keep no counter of their own (memory, issue 11): the totals must still be exact,
    and after draining to a quarter of the peak the message table is rebuilt (`shrunk`)."""
    for n in range(400):
        scheduler.add_message(queued_message(f"S{n:04d}", f"r{n}@x.test"))
    scheduler.add_message(queued_message("M", "a@x.test", "b@y.test"))
    scheduler.heartbeat("w", b"id", 2, [], now=0)
    for job in scheduler.dispatch(now=0):
        scheduler.finish_job(job.job_id)
        message = scheduler.messages[job.queue_id]
        for index in job.indices:
            scheduler.set_state(message, message.recipients[index], State.DEFERRED, 50.0)
    assert scheduler.recipient_counts[State.READY] + scheduler.recipient_counts[State.DEFERRED] == 402
    assert sum(scheduler.message_counts.values()) == 401
    for n in range(350):
        scheduler.remove_message(f"S{n:04d}")
    assert scheduler.shrunk and len(scheduler.messages) == 51
    scheduler.remove_message("M")
    assert sum(scheduler.recipient_counts.values()) == 50 and sum(scheduler.message_counts.values()) == 50
