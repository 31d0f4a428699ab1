"""Scheduler details the broader tests (test_queue_scheduler.py) left unchecked; each closes a gap mutation
testing found: deferred-heap bookkeeping, message locks, the max_recipients boundary, fair rotation over
workers and destinations, in-flight counters and the end of a destination's backoff streak."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from cluster.bus.schemas import OutcomeKind
from cluster.queue.records import RECIPIENT_SLOTS, LastOutcome, Message, Recipient, State
from cluster.queue.scheduler import Scheduler, SchedulerLimits
from tests.support.scheduling import queued_message

LIMITS = SchedulerLimits(destination_concurrency=2, max_recipients=3, lease_time=60, worker_timeout=10)


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(LIMITS)


def defer(scheduler: Scheduler, message: Message, index: int, when: float) -> None:
    scheduler.set_state(message, message.recipients[index], State.DEFERRED, when)


def test_promote_due_counts_every_recipient_and_keeps_later_ones(scheduler: Scheduler) -> None:
    first, second = queued_message("Q1", "a@x.test", "b@x.test"), queued_message("Q2", "c@y.test")
    for message in (first, second):
        scheduler.add_message(message)
    defer(scheduler, first, 0, 10)
    defer(scheduler, first, 1, 10)
    defer(scheduler, second, 0, 30)
    assert scheduler.next_deferred_time() == 10
    assert scheduler.promote_due(20) == 2
    assert [r.state for r in first.recipients] == [State.READY, State.READY]
    assert second.recipients[0].state is State.DEFERRED
    assert scheduler.next_deferred_time() == 30
    assert scheduler.promote_due(30) == 1
    assert scheduler.next_deferred_time() is None


def test_stale_heap_entries_are_skipped_without_stopping_the_promotion(scheduler: Scheduler) -> None:
    rescheduled, gone, due = (queued_message("Q1", "a@x.test"), queued_message("Q2", "b@x.test"),
                              queued_message("Q3", "c@x.test"))
    for message in (rescheduled, gone, due):
        scheduler.add_message(message)
    defer(scheduler, rescheduled, 0, 5)
    defer(scheduler, rescheduled, 0, 50)  # its entry at 5 is now stale
    defer(scheduler, gone, 0, 6)
    scheduler.remove_message("Q2")
    defer(scheduler, due, 0, 7)
    assert scheduler.promote_due(10) == 1
    assert due.recipients[0].state is State.READY
    assert rescheduled.recipients[0].state is State.DEFERRED
    assert scheduler.next_deferred_time() == 50


def test_a_locked_message_is_promoted_after_it_is_unlocked(scheduler: Scheduler) -> None:
    locked, free = queued_message("Q1", "a@x.test"), queued_message("Q2", "b@y.test")
    for message in (locked, free):
        scheduler.add_message(message)
    defer(scheduler, locked, 0, 5)
    defer(scheduler, free, 0, 6)
    scheduler.lock("Q1")
    assert scheduler.is_locked("Q1") and not scheduler.is_locked("Q2")
    assert scheduler.promote_due(10) == 1  # the locked one is postponed, the other still promoted
    assert free.recipients[0].state is State.READY
    assert scheduler.next_deferred_time() == 5
    scheduler.unlock("Q1")
    assert scheduler.promote_due(10) == 1 and locked.recipients[0].state is State.READY


def test_unlock_queues_the_ready_recipients_again(scheduler: Scheduler) -> None:
    message = queued_message("Q1", "a@x.test", "b@y.test")
    scheduler.add_message(message)
    scheduler.set_state(message, message.recipients[1], State.HELD)
    scheduler.heartbeat("w", b"id", 10, [], now=0)
    scheduler.lock("Q1")
    assert scheduler.dispatch(now=0) == []  # the lock drops it from the ready queue
    scheduler.unlock("Q1")
    (job,) = scheduler.dispatch(now=0)
    assert (job.queue_id, job.domain, job.indices) == ("Q1", "x.test", [0])
    scheduler.unlock("Q-unknown")  # nothing to do, and no error


def test_removing_a_message_takes_it_out_of_the_message_counts(scheduler: Scheduler) -> None:
    for queue_id in ("Q1", "Q2"):
        scheduler.add_message(queued_message(queue_id, "a@x.test"))
    assert scheduler.message_counts == Counter({State.READY: 2})
    assert scheduler.remove_message("Q1") is not None
    assert scheduler.message_counts[State.READY] == 1 and scheduler.recipient_counts[State.READY] == 1
    assert scheduler.remove_message("Q1") is None


def test_exactly_max_recipients_make_one_job_and_the_message_leaves_the_queue(scheduler: Scheduler) -> None:
    scheduler.add_message(queued_message("Q1", "a@x.test", "b@x.test", "c@x.test"))
    scheduler.heartbeat("w", b"id", 10, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    assert job.indices == [0, 1, 2]
    assert scheduler.dispatch(now=0) == []


def test_jobs_record_when_they_were_assigned(scheduler: Scheduler) -> None:
    scheduler.add_message(queued_message("Q1", "a@x.test"))
    scheduler.heartbeat("w", b"id", 10, [], now=0)
    (job,) = scheduler.dispatch(now=42)
    assert (job.worker, job.assigned_at, job.lease_until) == ("w", 42, 42 + LIMITS.lease_time)
    assert scheduler.workers["w"].jobs == {job.job_id}


def test_workers_take_turns(scheduler: Scheduler) -> None:
    for i in range(6):
        scheduler.add_message(queued_message(f"Q{i}", f"r@d{i}.test"))
    for name in ("w1", "w2", "w3"):
        scheduler.heartbeat(name, name.encode(), 10, [], now=0)
    workers = [job.worker for job in scheduler.dispatch(now=0)]
    assert sorted(Counter(workers).values()) == [2, 2, 2]
    assert all(a != b for a, b in itertools.pairwise(workers))


def test_destinations_take_turns(scheduler: Scheduler) -> None:
    for i in range(2):
        scheduler.add_message(queued_message(f"A{i}", f"r{i}@a.test"))
        scheduler.add_message(queued_message(f"B{i}", f"r{i}@b.test"))
        scheduler.add_message(queued_message(f"C{i}", f"r{i}@c.test"))
    scheduler.heartbeat("w", b"id", 100, [], now=0)
    domains = [job.domain for job in scheduler.dispatch(now=0)]
    assert domains[:3] == ["a.test", "b.test", "c.test"] and domains[3:] == domains[:3]


def test_a_destination_at_its_concurrency_does_not_block_the_others(scheduler: Scheduler) -> None:
    for i in range(3):
        scheduler.add_message(queued_message(f"A{i}", f"r{i}@busy.test"))
    scheduler.heartbeat("w", b"id", 100, [], now=0)
    assert [job.domain for job in scheduler.dispatch(now=0)] == ["busy.test", "busy.test"]
    scheduler.add_message(queued_message("B0", "r@quiet.test"))
    assert [job.domain for job in scheduler.dispatch(now=0)] == ["quiet.test"]


def test_finishing_jobs_frees_the_destination_and_the_worker(scheduler: Scheduler) -> None:
    for i in range(3):
        scheduler.add_message(queued_message(f"A{i}", f"r{i}@x.test"))
    scheduler.heartbeat("w", b"id", 10, [], now=0)
    first, second = scheduler.dispatch(now=0)
    assert scheduler.in_flight_jobs_of("x.test") == 2
    scheduler.finish_job(first.job_id)
    assert scheduler.in_flight_jobs_of("x.test") == 1
    assert scheduler.workers["w"].jobs == {second.job_id}
    scheduler.finish_job(second.job_id)
    assert scheduler.in_flight_jobs_of("x.test") == 0 and scheduler.workers["w"].jobs == set()
    (third,) = scheduler.dispatch(now=0)
    assert third.queue_id == "A2"


def test_one_delivered_job_ends_the_deferral_streak_and_the_backoff(scheduler: Scheduler) -> None:
    for _ in range(LIMITS.backoff_after - 1):
        assert scheduler.note_destination("x.test", True, now=0, backoff=100) is False
    assert scheduler.note_destination("x.test", False, now=0, backoff=100) is False
    for _ in range(LIMITS.backoff_after - 1):
        assert scheduler.note_destination("x.test", True, now=0, backoff=100) is False
    assert scheduler.note_destination("x.test", True, now=0, backoff=100) is True
    assert scheduler.backoff_until == {"x.test": 100}
    assert scheduler.note_destination("x.test", False, now=1, backoff=100) is False
    assert scheduler.backoff_until == {}


def recount(scheduler: Scheduler) -> tuple[Counter[State], Counter[State]]:
    """The per-state counters as a scan of every message gives them (what the kept counters must equal)."""
    recipients: Counter[State] = Counter()
    messages: Counter[State] = Counter()
    for message in scheduler.messages.values():
        pending = Counter(r.state for r in message.recipients if not r.state.done)
        recipients.update(pending)
        first = next((s for s in (State.IN_FLIGHT, State.READY, State.DEFERRED, State.HELD) if pending[s]), None)
        if first is not None:
            messages[first] += 1
    return recipients, messages


def test_the_counters_of_many_recipient_messages_stay_exact() -> None:
    """A message's recipients are counted once per message at add and at dispatch (100 at a time in bulk)."""
    scheduler = Scheduler(SchedulerLimits(destination_concurrency=5, max_recipients=4, lease_time=60,
                                          worker_timeout=10))
    mixed = queued_message("Q1", *(f"r{i}@x.test" for i in range(6)), "s@y.test")
    for recipient, state in zip(mixed.recipients, [State.READY, State.DEFERRED, State.HELD, State.DELIVERED,
                                                   State.READY, State.READY, State.READY], strict=True):
        recipient.state, recipient.next_attempt = state, 50.0
    bulk = queued_message("Q2", *(f"b{i}@x.test" for i in range(10)))
    single = queued_message("Q3", "one@y.test")
    for message in (mixed, bulk, single):
        scheduler.add_message(message)
        assert (+scheduler.recipient_counts, +scheduler.message_counts) == recount(scheduler)
    assert mixed.recipients[1].state is State.DEFERRED and scheduler.next_deferred_time() == 50.0
    assert mixed.recipients[0].next_attempt == 0.0  # ready: no next attempt
    scheduler.heartbeat("w", b"w", 20, [], 0.0)
    jobs = scheduler.dispatch(0.0)
    assert sorted(len(job.indices) for job in jobs) == [1, 1, 2, 3, 4, 4]  # max_recipients 4: bulk 10 = 4 + 4 + 2
    assert (+scheduler.recipient_counts, +scheduler.message_counts) == recount(scheduler)
    assert scheduler.message_counts[State.IN_FLIGHT] == 3 and scheduler.recipient_counts[State.READY] == 0
    for job in jobs:
        message = scheduler.messages[job.queue_id]
        for index in job.indices:
            scheduler.set_state(message, message.recipients[index], State.DELIVERED)
        scheduler.finish_job(job.job_id)
        assert (+scheduler.recipient_counts, +scheduler.message_counts) == recount(scheduler)
    jobs = scheduler.dispatch(0.0)
    assert (+scheduler.recipient_counts, +scheduler.message_counts) == recount(scheduler)
    scheduler.remove_message("Q2")
    scheduler.remove_message("Q1")
    assert (+scheduler.recipient_counts, +scheduler.message_counts) == recount(scheduler)


def test_a_recipient_clone_copies_every_field() -> None:
    """`Recipient.clone` writes its fields out (it runs per outcome): a field added later must be copied too."""
    original = Recipient(3, "Bob@Example.COM", State.DEFERRED, 2, 42.5,
                         LastOutcome(OutcomeKind.DEFERRED, 451, "4.2.0", "later", "mx[192.0.2.1]"))
    copy = original.clone()
    assert copy is not original and original.domain == "example.com"
    assert [getattr(copy, name) for name in RECIPIENT_SLOTS] == [getattr(original, name) for name in RECIPIENT_SLOTS]
    copy.state = State.READY
    assert original.state is State.DEFERRED
