"""The scheduler of one shard (pure: no I/O, time comes in as `now`).

Holds the in-memory view of every queued message and decides what to deliver next:
- ready queues per destination domain (`domain_key`), served round-robin across destinations;
- a heap of deferred recipients ordered by their next attempt time;
- jobs in flight, each with a lease; at most `destination_concurrency` jobs per destination at once;
- destination backoff: a destination whose last jobs were all deferred waits as a whole;
- workers with credits (schemas docstring: credit-based flow control): set from `free` on first contact,
  one spent per job dispatched, one back when the job ends (its Result, or taken back from the worker);
- locked messages (`lock`/`unlock`, held by ledger.py while a change to them is decided and committed):
  their recipients are neither dispatched nor promoted until unlocked.

A job is the ready recipients of one message for one domain (at most `max_recipients` of them).
Every recipient state change goes through `set_state`, which keeps the per-state counters for metrics exact
without scanning. The caller (the shard) writes changes to the spool before calling `set_state` with them.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field

from cluster.queue.records import Message, Recipient, State

MESSAGE_STATE_ORDER = (State.IN_FLIGHT, State.READY, State.DEFERRED, State.HELD)


@dataclass
class Job:
    job_id: str
    queue_id: str
    domain: str
    indices: list[int]
    attempt: int
    worker: str = ""
    assigned_at: float = 0.0
    lease_until: float = 0.0
    # Number of the Deliver that carried this job to its worker (0 = not sent yet); see bus/schemas.py.
    seq: int = 0


@dataclass
class WorkerState:
    name: str
    identity: bytes
    credits: int
    last_seen: float
    jobs: set[str] = field(default_factory=set)
    # seq of the last Deliver sent to this worker.
    last_seq: int = 0


@dataclass(frozen=True)
class SchedulerLimits:
    destination_concurrency: int
    max_recipients: int
    lease_time: float
    worker_timeout: float
    # Consecutive fully deferred jobs after which a destination is backed off as a whole.
    backoff_after: int = 3


class Scheduler:
    def __init__(self, limits: SchedulerLimits, job_prefix: str = "") -> None:
        self.limits = limits
        self.messages: dict[str, Message] = {}
        self.jobs: dict[str, Job] = {}
        self.workers: dict[str, WorkerState] = {}
        self.recipient_counts: Counter[State] = Counter()
        self.message_counts: Counter[State] = Counter()
        self.leases_expired = 0
        self._per_message: dict[str, Counter[State]] = {}
        self._ready: dict[str, deque[str]] = {}
        self._queued: set[tuple[str, str]] = set()
        self._domains: deque[str] = deque()
        self._deferred: list[tuple[float, str, int]] = []
        self._in_flight_per_domain: Counter[str] = Counter()
        self._deferred_streak: Counter[str] = Counter()
        self.backoff_until: dict[str, float] = {}
        self._locked: set[str] = set()
        self._job_ids = itertools.count(1)
        self._job_prefix = job_prefix
        self._worker_cursor = 0

    # -- messages and recipient states --------------------------------------------------------------------

    def add_message(self, message: Message) -> None:
        """Track a stored message; its recipients keep the states they have (done ones are ignored)."""
        self.messages[message.queue_id] = message
        self._per_message[message.queue_id] = Counter()
        for recipient in message.recipients:
            if not recipient.state.done:
                state = recipient.state
                recipient.state = State.DELIVERED  # counted as nothing until set_state counts it
                self.set_state(message, recipient, state, recipient.next_attempt)

    def remove_message(self, queue_id: str) -> Message | None:
        message = self.messages.pop(queue_id, None)
        if message is None:
            return None
        counts = self._per_message.pop(queue_id)
        for state, count in counts.items():
            self.recipient_counts[state] -= count
        old = _message_state(counts)
        if old is not None:
            self.message_counts[old] -= 1
        return message

    def set_state(self, message: Message, recipient: Recipient, state: State, next_attempt: float = 0.0) -> None:
        counts = self._per_message[message.queue_id]
        old_message_state = _message_state(counts)
        if not recipient.state.done:
            counts[recipient.state] -= 1
            self.recipient_counts[recipient.state] -= 1
        recipient.state = state
        if not state.done:
            counts[state] += 1
            self.recipient_counts[state] += 1
        new_message_state = _message_state(counts)
        if old_message_state != new_message_state:
            if old_message_state is not None:
                self.message_counts[old_message_state] -= 1
            if new_message_state is not None:
                self.message_counts[new_message_state] += 1
        if state is State.READY:
            recipient.next_attempt = 0.0
            self._enqueue(recipient.domain, message.queue_id)
        elif state is State.DEFERRED:
            recipient.next_attempt = next_attempt
            heapq.heappush(self._deferred, (next_attempt, message.queue_id, recipient.index))

    def _enqueue(self, domain: str, queue_id: str) -> None:
        if (domain, queue_id) in self._queued:
            return
        self._queued.add((domain, queue_id))
        queue = self._ready.get(domain)
        if queue is None:
            queue = self._ready[domain] = deque()
            self._domains.append(domain)
        queue.append(queue_id)

    def promote_due(self, now: float) -> int:
        """Deferred recipients whose time has come become ready; returns how many."""
        promoted = 0
        postponed: list[tuple[float, str, int]] = []
        while self._deferred and self._deferred[0][0] <= now:
            entry = heapq.heappop(self._deferred)
            when, queue_id, index = entry
            message = self.messages.get(queue_id)
            if message is None:
                continue
            if queue_id in self._locked:
                postponed.append(entry)
                continue
            recipient = message.recipients[index]
            if recipient.state is State.DEFERRED and recipient.next_attempt == when:
                self.set_state(message, recipient, State.READY)
                promoted += 1
        for entry in postponed:
            heapq.heappush(self._deferred, entry)
        return promoted

    # -- locks (ledger.py) --------------------------------------------------------------------------------

    def lock(self, queue_id: str) -> None:
        """A change to this message is being decided and committed: leave its recipients alone."""
        self._locked.add(queue_id)

    def unlock(self, queue_id: str) -> None:
        """The change is over: ready recipients can be dispatched again (the caller wakes the dispatcher)."""
        self._locked.discard(queue_id)
        message = self.messages.get(queue_id)
        if message is not None:
            for recipient in message.recipients:
                if recipient.state is State.READY:
                    self._enqueue(recipient.domain, queue_id)

    def is_locked(self, queue_id: str) -> bool:
        return queue_id in self._locked

    def next_deferred_time(self) -> float | None:
        return self._deferred[0][0] if self._deferred else None

    # -- jobs ---------------------------------------------------------------------------------------------

    def dispatch(self, now: float) -> list[Job]:
        """Make as many jobs as workers have credits for, and assign them (recipients become in_flight)."""
        jobs: list[Job] = []
        while True:
            worker = self._next_worker()
            if worker is None:
                break
            job = self._next_job(now)
            if job is None:
                break
            job.worker = worker.name
            job.assigned_at = now
            job.lease_until = now + self.limits.lease_time
            worker.credits -= 1
            worker.jobs.add(job.job_id)
            jobs.append(job)
        return jobs

    def _next_worker(self) -> WorkerState | None:
        workers = [w for w in self.workers.values() if w.credits > 0]
        if not workers:
            return None
        self._worker_cursor = (self._worker_cursor + 1) % len(workers)
        return workers[self._worker_cursor]

    def _next_job(self, now: float) -> Job | None:
        for _ in range(len(self._domains)):
            domain = self._domains[0]
            self._domains.rotate(-1)
            if self._in_flight_per_domain[domain] >= self.limits.destination_concurrency:
                continue
            if self.backoff_until.get(domain, 0.0) > now:
                continue
            job = self._job_from(domain)
            if job is not None:
                return job
        return None

    def _job_from(self, domain: str) -> Job | None:
        queue = self._ready[domain]
        while queue:
            queue_id = queue[0]
            if queue_id in self._locked:  # `unlock` queues it again
                queue.popleft()
                self._queued.discard((domain, queue_id))
                continue
            message = self.messages.get(queue_id)
            ready = [] if message is None else [
                r for r in message.recipients if r.state is State.READY and r.domain == domain]
            if len(ready) <= self.limits.max_recipients:
                queue.popleft()
                self._queued.discard((domain, queue_id))
            if message is None or not ready:
                continue
            chosen = ready[:self.limits.max_recipients]
            job = Job(f"{self._job_prefix}{next(self._job_ids)}", queue_id, domain, [r.index for r in chosen],
                      attempt=max(r.attempts for r in chosen) + 1)
            for recipient in chosen:
                self.set_state(message, recipient, State.IN_FLIGHT)
            self.jobs[job.job_id] = job
            self._in_flight_per_domain[domain] += 1
            self._drop_domain_if_idle(domain)
            return job
        self._drop_domain_if_idle(domain)
        return None

    def _drop_domain_if_idle(self, domain: str) -> None:
        if not self._ready[domain]:
            del self._ready[domain]
            self._domains.remove(domain)

    def finish_job(self, job_id: str) -> Job | None:
        """Forget a job and give its credit back to its worker; the caller sets its recipients' new states.

        Credits: a job charged one credit when it was dispatched, and gives it back exactly once, whether its
        Result arrives or the job is taken back (then no Result is expected, and a late one is ignored).
        """
        job = self.jobs.pop(job_id, None)
        if job is None:
            return None
        self._in_flight_per_domain[job.domain] -= 1
        if self._in_flight_per_domain[job.domain] <= 0:
            del self._in_flight_per_domain[job.domain]
        worker = self.workers.get(job.worker)
        if worker is not None:
            worker.jobs.discard(job_id)
            worker.credits += 1
        return job

    def return_job(self, job_id: str) -> Job | None:
        """Put a job's recipients that are still in flight back to ready (vanished worker, expired lease)."""
        job = self.finish_job(job_id)
        if job is None:
            return None
        message = self.messages.get(job.queue_id)
        if message is not None:
            for index in job.indices:
                recipient = message.recipients[index]
                if recipient.state is State.IN_FLIGHT:
                    self.set_state(message, recipient, State.READY)
        return job

    def in_flight_jobs_of(self, domain: str) -> int:
        return self._in_flight_per_domain[domain]

    # -- destination backoff ------------------------------------------------------------------------------

    def note_destination(self, domain: str, all_deferred: bool, now: float, backoff: float) -> bool:
        """Record how a job to `domain` ended; returns True when the destination is now backed off."""
        if not all_deferred:
            self._deferred_streak.pop(domain, None)
            self.backoff_until.pop(domain, None)
            return False
        self._deferred_streak[domain] += 1
        if self._deferred_streak[domain] >= self.limits.backoff_after:
            self.backoff_until[domain] = now + backoff
            return True
        return False

    def clear_backoff(self, domain: str | None = None) -> int:
        """Serve a backed-off destination (or all, for None) again now; returns how many were backed off."""
        over = [d for d in self.backoff_until if domain is None or d == domain]
        for name in over:
            del self.backoff_until[name]
        return len(over)

    def end_backoffs(self, now: float) -> bool:
        """Forget backoffs that are over; True when some destination may be served again."""
        over = [domain for domain, until in self.backoff_until.items() if until <= now]
        for domain in over:
            del self.backoff_until[domain]
        return bool(over)

    # -- workers ------------------------------------------------------------------------------------------

    def heartbeat(self, name: str, identity: bytes, free: int, in_flight: list[str], now: float,
                  seen: int = 0) -> list[Job]:
        """Renew the leases of the jobs a worker lists; jobs it should hold but does not list go back to ready.

        A job counts as missing only when the worker says it received its Deliver (job.seq <= seen): a heartbeat
        that crossed a Deliver on the wire never takes back the job the worker is about to receive.
        `seen` must be 0 when the worker's count belongs to another shard instance (epoch).
        """
        worker = self.workers.get(name)
        if worker is None:
            self.workers[name] = WorkerState(name, identity, max(free, 0), now)
            return []
        worker.identity = identity
        worker.last_seen = now
        listed = set(in_flight)
        returned: list[Job] = []
        for job_id in list(worker.jobs):
            job = self.jobs[job_id]
            if job_id in listed:
                job.lease_until = now + self.limits.lease_time
            elif 0 < job.seq <= seen:
                taken_back = self.return_job(job_id)
                if taken_back is not None:
                    returned.append(taken_back)
        return returned

    def next_seq(self, job: Job) -> int:
        """Number the Deliver about to carry `job` to its worker."""
        worker = self.workers[job.worker]
        worker.last_seq += 1
        job.seq = worker.last_seq
        return job.seq

    def seen(self, name: str, identity: bytes, now: float) -> None:
        """A worker sent something: it is alive, and replies go to its current socket."""
        worker = self.workers.get(name)
        if worker is not None:
            worker.identity = identity
            worker.last_seen = now

    def expire(self, now: float) -> list[Job]:
        """Take back jobs of silent workers (worker_timeout) and jobs whose lease ran out."""
        returned: list[Job] = []
        for name, worker in list(self.workers.items()):
            if now - worker.last_seen >= self.limits.worker_timeout:
                del self.workers[name]
                for job_id in list(worker.jobs):
                    job = self.return_job(job_id)
                    if job is not None:
                        returned.append(job)
        for job_id, job in list(self.jobs.items()):
            if job.lease_until <= now:
                taken_back = self.return_job(job_id)
                if taken_back is not None:
                    returned.append(taken_back)
        self.leases_expired += len(returned)
        return returned


def _message_state(counts: Counter[State]) -> State | None:
    for state in MESSAGE_STATE_ORDER:
        if counts[state] > 0:
            return state
    return None
