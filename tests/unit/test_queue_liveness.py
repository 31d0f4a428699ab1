"""Liveness and duplicates of the dispatch protocol under pauses and network cuts, with a virtual clock.

The shard side is the real `Scheduler`, the worker side the real `ShardSession`; only the wire and the SMTP
peer are simulated. The scenario tests pin the faults of issue 8 (a shard that stopped dispatching for good
after a pause longer than worker_timeout; duplicates without a crash); the property test throws random pauses
and cuts at the pair and checks that everything is delivered once the faults end, and that every duplicate
is counted as a possible duplicate.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.bus.schemas import BusMessage, Deliver, Heartbeat, HeartbeatAck, Result, decode
from cluster.delivery.shard_session import ShardSession
from cluster.queue.records import State
from cluster.queue.scheduler import Scheduler, SchedulerLimits
from tests.support.scheduling import queued_message

LIMITS = SchedulerLimits(destination_concurrency=20, max_recipients=50, lease_time=30, worker_timeout=5)
STEP = 0.1
HEARTBEAT_EVERY = 10  # steps: 1 s
EPOCH = "epoch-1"


# -- scenarios with the scheduler alone -------------------------------------------------------------------------


def test_credits_come_back_after_a_silence_longer_than_worker_timeout() -> None:
    """Issue 8, found 1: expire() forgot the worker, a backlog heartbeat (free=0) registered it with 0 credits,
    the Results of its old jobs were ignored, and later heartbeats (free=20) never gave credits back."""
    scheduler = Scheduler(LIMITS)
    for i in range(20):
        scheduler.add_message(queued_message(f"Q{i}", f"r@d{i}.test"))
    scheduler.heartbeat("a", b"a", 20, [], now=0)
    jobs = scheduler.dispatch(now=0)
    assert len(jobs) == 20
    for job in jobs:
        scheduler.next_seq(job)
    assert len(scheduler.expire(now=15)) == 20  # "a" was cut off for 15 s
    scheduler.heartbeat("b", b"b", 20, [], now=15)
    assert len(scheduler.dispatch(now=15)) == 20  # its jobs went to "b"
    # What "a" sent once the cut healed: a heartbeat from while it held all 20 jobs, their Results, then
    # heartbeats with every slot free.
    outcome = scheduler.heartbeat("a", b"a", 0, [j.job_id for j in jobs], now=15.2)
    assert outcome.registered and sorted(outcome.revoked) == sorted(j.job_id for j in jobs)
    for job in jobs:
        decision = scheduler.take_result(job.job_id, "a")
        assert decision is not None and decision.stale and decision.duplicates == [0]
    for i in range(20, 40):
        scheduler.add_message(queued_message(f"Q{i}", f"r@d{i}.test"))
    scheduler.heartbeat("a", b"a", 20, [], now=15.3)
    assert len(scheduler.dispatch(now=15.3)) == 20  # credits rebuilt from `free`, not from history
    assert scheduler.possible_duplicates == 20


def test_a_heartbeat_from_an_earlier_registration_takes_nothing_back() -> None:
    """Issue 8, found 2: after re-registration Delivers were numbered from 1 again while the worker still
    reported its old, higher `seen`, so a heartbeat crossing new Delivers took them back."""
    scheduler = Scheduler(LIMITS)
    for i in range(3):
        scheduler.add_message(queued_message(f"Q{i}", f"r@d{i}.test"))
    first = scheduler.heartbeat("w", b"id", 1, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    for _ in range(5):
        scheduler.next_seq(job)  # as if five Delivers had gone out: seq 5
    scheduler.expire(now=10)
    second = scheduler.heartbeat("w", b"id", 1, [], now=10, seen=5, incarnation=first.incarnation)
    assert second.registered and second.incarnation != first.incarnation
    (new_job,) = scheduler.dispatch(now=10)
    assert scheduler.next_seq(new_job) == 1
    # A heartbeat sent before the new Deliver arrived, still counting in the old registration.
    late = scheduler.heartbeat("w", b"id", 1, [], now=10.1, seen=5, incarnation=first.incarnation)
    assert late.returned == [] and new_job.job_id in scheduler.jobs


def test_a_worker_still_holding_a_taken_back_job_gets_it_back() -> None:
    scheduler = Scheduler(LIMITS)
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    scheduler.next_seq(job)
    scheduler.expire(now=6)
    assert scheduler.recipient_counts[State.READY] == 1
    outcome = scheduler.heartbeat("w", b"id", 4, [job.job_id], now=6)
    assert outcome.adopted == [job.job_id] and outcome.revoked == []
    assert scheduler.recipient_counts[State.IN_FLIGHT] == 1 and scheduler.dispatch(now=6) == []
    decision = scheduler.take_result(job.job_id, "w")
    assert decision is not None and decision.job.indices == [0] and not decision.stale
    assert scheduler.possible_duplicates == 0


def test_a_taken_back_job_handed_out_again_is_revoked_and_its_late_result_counted() -> None:
    scheduler = Scheduler(LIMITS)
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.heartbeat("a", b"a", 5, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    scheduler.next_seq(job)
    scheduler.expire(now=6)  # "a" was silent (a network cut)
    scheduler.heartbeat("b", b"b", 5, [], now=6)
    (again,) = scheduler.dispatch(now=6)
    assert again.worker == "b" and scheduler.possible_duplicates == 1
    outcome = scheduler.heartbeat("a", b"a", 4, [job.job_id], now=7)
    assert outcome.revoked == [job.job_id]  # "a" must not start it if it has not yet
    decision = scheduler.take_result(job.job_id, "a")  # "a" had started it: a late Result
    assert decision is not None and decision.stale and decision.job.indices == [] and decision.duplicates == [0]


def test_a_late_result_decides_recipients_not_handed_out_again() -> None:
    scheduler = Scheduler(LIMITS)
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    scheduler.next_seq(job)
    scheduler.expire(now=6)
    decision = scheduler.take_result(job.job_id, "w")
    assert decision is not None and decision.stale and decision.job.indices == [0]
    assert scheduler.recipient_counts[State.IN_FLIGHT] == 1  # the caller records the outcome
    assert scheduler.take_result(job.job_id, "w") is None  # a repeated Result decides nothing
    assert scheduler.possible_duplicates == 0


def test_lost_results_are_asked_for_again_and_forgotten_once_recorded() -> None:
    scheduler = Scheduler(LIMITS)
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    scheduler.next_seq(job)
    outcome = scheduler.heartbeat("w", b"id", 5, [], now=1, finished=[job.job_id], seen=1, incarnation=1)
    assert outcome.resend == [job.job_id] and outcome.returned == []
    scheduler.take_result(job.job_id, "w")
    outcome = scheduler.heartbeat("w", b"id", 5, [], now=2, finished=[job.job_id], seen=1, incarnation=1)
    assert outcome.revoked == [job.job_id] and outcome.resend == []


def test_silence_is_judged_on_when_messages_were_sent() -> None:
    scheduler = Scheduler(LIMITS)
    scheduler.heartbeat("w", b"id", 5, [], now=100.0, sent=7.0)  # worker clock 93 s behind ours
    scheduler.heartbeat("w", b"id", 5, [], now=101.0, sent=8.0)
    # A backlog read at 120 after a pause: the worker sent its last heartbeat at 9 (102 on our clock) and died.
    scheduler.heartbeat("w", b"id", 5, [], now=120.0, sent=9.0)
    assert scheduler.workers["w"].last_seen == pytest.approx(102.0, abs=0.05)  # allowing for clock drift
    assert "w" in scheduler.workers and scheduler.expire(now=120.0) == [] and "w" not in scheduler.workers


# -- the pair under random faults -------------------------------------------------------------------------------


@dataclass
class SimWorker:
    name: str
    session: ShardSession
    job_steps: int
    running: dict[str, int] = field(default_factory=dict)  # job id -> step it completes
    jobs: dict[str, Deliver] = field(default_factory=dict)


@dataclass
class Sim:
    scheduler: Scheduler
    workers: list[SimWorker]
    to_shard: deque[tuple[str, bytes]] = field(default_factory=deque)
    to_worker: dict[str, deque[bytes]] = field(default_factory=dict)
    sink: Counter[tuple[str, int]] = field(default_factory=Counter)
    step: int = 0
    paused: bool = False
    cut: set[str] = field(default_factory=set)  # workers cut off from the shard

    @property
    def now(self) -> float:
        return self.step * STEP

    def send_to_shard(self, worker: str, message: BusMessage) -> None:
        if worker not in self.cut:
            self.to_shard.append((worker, message.encode()))

    def send_to_worker(self, worker: str, message: BusMessage) -> None:
        if worker not in self.cut:
            self.to_worker[worker].append(message.encode())

    def cut_link(self, workers: set[str]) -> None:
        """Broken connections: what was queued on either side is lost (as ZeroMQ drops a dead pipe)."""
        self.cut |= workers
        self.to_shard = deque((w, frame) for w, frame in self.to_shard if w not in workers)
        for worker in workers:
            self.to_worker[worker].clear()

    def run_shard(self) -> None:
        scheduler = self.scheduler
        now = self.now
        while self.to_shard:  # drain the inbox before judging anyone silent
            worker, frame = self.to_shard.popleft()
            message = decode(frame)
            if isinstance(message, Heartbeat):
                seen = message.seen if message.seen_epoch == EPOCH else 0
                outcome = scheduler.heartbeat(message.worker, worker.encode(), message.free, message.in_flight, now,
                                              seen, message.incarnation, message.sent, message.finished)
                self.send_to_worker(worker, HeartbeatAck(0, EPOCH, outcome.incarnation, outcome.last_seq,
                                                         outcome.revoked, outcome.resend))
            elif isinstance(message, Result):
                scheduler.seen(message.worker, worker.encode(), now)
                decision = scheduler.take_result(message.job_id, message.worker)
                if decision is not None:
                    queued = scheduler.messages[decision.job.queue_id]
                    for index in decision.job.indices:
                        scheduler.set_state(queued, queued.recipients[index], State.DELIVERED)
                    if all(r.state.done for r in queued.recipients):
                        scheduler.remove_message(queued.queue_id)
        scheduler.expire(now)
        for job in scheduler.dispatch(now):
            queued = scheduler.messages[job.queue_id]
            seq = scheduler.next_seq(job)
            self.send_to_worker(job.worker, Deliver(
                job.job_id, job.queue_id, queued.sender, [queued.recipients[i].address for i in job.indices],
                job.domain, b"", job.attempt, seq, EPOCH, job.incarnation))
            scheduler.note_sent(job)

    def run_worker(self, worker: SimWorker) -> None:
        session, now = worker.session, self.now
        inbox = self.to_worker[worker.name]
        while inbox:
            message = decode(inbox.popleft())
            if isinstance(message, HeartbeatAck):
                actions = session.on_ack(message, now)
                for job_id in actions.dropped:
                    worker.jobs.pop(job_id, None)
                for frame in actions.resend:
                    self.send_to_shard(worker.name, decode(frame))
            elif isinstance(message, Deliver) and session.accept(message):
                worker.jobs[message.job_id] = message
        for job_id in list(session.waiting):
            if len(session.running) < session.concurrency and not session.fenced(now) and session.start(job_id):
                worker.running[job_id] = self.step + worker.job_steps
        for job_id, done_at in list(worker.running.items()):
            if done_at <= self.step:
                del worker.running[job_id]
                job = worker.jobs.pop(job_id)
                for recipient in job.recipients:  # recipient 0 is a<i>@..., 1 is b<i>@...
                    self.sink[(job.queue_id, 0 if recipient.startswith("a") else 1)] += 1
                result = Result(job_id, worker.name, [])
                session.finish(job_id, result.encode())
                self.send_to_shard(worker.name, result)
        if self.step % HEARTBEAT_EVERY == 0:
            self.send_to_shard(worker.name, session.heartbeat(worker.name, now))

    def tick(self) -> None:
        self.step += 1
        for worker in self.workers:
            self.run_worker(worker)
        if not self.paused:
            self.run_shard()


def simulate(messages: int, job_steps: list[int], faults: list[tuple[str, int, int]]) -> tuple[Sim, int]:
    """Run the pair through `faults` ((kind, start step, length) in steps), then until all is delivered.
    Returns the simulation and the steps needed after the last fault ended (-1: never)."""
    scheduler = Scheduler(LIMITS, job_prefix=f"{EPOCH}.")
    for i in range(messages):
        scheduler.add_message(queued_message(f"Q{i}", f"a{i}@d{i % 3}.test", f"b{i}@e{i % 2}.test"))
    expected = {(f"Q{i}", r) for i in range(messages) for r in range(2)}
    workers = [SimWorker(f"w{i}", ShardSession(4, LIMITS.worker_timeout / 2), steps)
               for i, steps in enumerate(job_steps)]
    sim = Sim(scheduler, workers, to_worker={w.name: deque() for w in workers})
    events = sorted([(start, kind, True) for kind, start, _ in faults]
                    + [(start + length, kind, False) for kind, start, length in faults])
    last_fault_end = max((start + length for _, start, length in faults), default=0)
    for step in range(last_fault_end + 2000):
        while events and events[0][0] <= sim.step:
            _, kind, begin = events.pop(0)
            cut_off = {w.name for w in workers} if kind == "cut" else {"w0"}
            if kind == "pause":
                sim.paused = begin
            elif begin:
                sim.cut_link(cut_off)
            else:
                sim.cut -= cut_off
        sim.tick()
        if sim.step > last_fault_end and set(sim.sink) >= expected and not scheduler.messages:
            return sim, step - last_fault_end
    return sim, -1


def test_a_pause_of_twice_worker_timeout_under_load_recovers_without_duplicates() -> None:
    sim, after = simulate(60, [15, 25], [("pause", 30, 100)])
    assert after >= 0, f"stuck: {sim.scheduler.recipient_counts}"
    assert max(sim.sink.values()) == 1 and sim.scheduler.possible_duplicates == 0


@pytest.mark.parametrize("kind", ["cut", "cut w0"])
def test_a_cut_of_six_times_worker_timeout_recovers_and_counts_its_duplicates(kind: str) -> None:
    sim, after = simulate(60, [15, 25], [(kind, 30, 300)])
    assert after >= 0, f"stuck: {sim.scheduler.recipient_counts}"
    duplicates = sum(count - 1 for count in sim.sink.values())
    assert duplicates <= sim.scheduler.possible_duplicates


faults = st.lists(st.tuples(st.sampled_from(["pause", "cut", "cut w0"]), st.integers(0, 400), st.integers(1, 400)),
                  max_size=4)


@settings(max_examples=150, deadline=None)
@given(messages=st.integers(1, 40), job_steps=st.lists(st.integers(1, 80), min_size=1, max_size=3), faults=faults)
def test_every_message_is_delivered_after_any_pauses_and_cuts(messages: int, job_steps: list[int],
                                                              faults: list[tuple[str, int, int]]) -> None:
    sim, after = simulate(messages, job_steps, faults)
    assert after >= 0, (f"stuck: {sim.scheduler.recipient_counts}, "
                        f"credits {[(w.name, w.credits) for w in sim.scheduler.workers.values()]}")
    # Liveness bound: the lease of a job lost on the wire, plus all the work done by one worker, plus a few
    # heartbeats.
    jobs = 2 * messages
    assert after * STEP <= LIMITS.lease_time + (jobs // 4 + 1) * max(job_steps) * STEP + 5
    duplicates = sum(count - 1 for count in sim.sink.values())
    assert duplicates <= sim.scheduler.possible_duplicates


def test_the_time_the_shard_was_stalled_is_excused() -> None:
    scheduler = Scheduler(LIMITS)
    scheduler.add_message(queued_message("Q", "r@x.test"))
    scheduler.heartbeat("w", b"id", 5, [], now=0)
    (job,) = scheduler.dispatch(now=0)
    scheduler.excuse(100)  # the shard was paused from 1 to 101
    assert scheduler.expire(now=101) == [] and scheduler.jobs[job.job_id].lease_until == 100 + LIMITS.lease_time
    assert [j.job_id for j in scheduler.expire(now=100 + LIMITS.worker_timeout)] == [job.job_id]
