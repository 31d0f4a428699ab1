"""The scheduler of one shard (pure: no I/O, time comes in as `now`).

Holds the in-memory view of every queued message and decides what to deliver next:
- ready queues per lane, served round-robin across lanes: a lane is a destination domain (`domain_key`), or,
  when egress pools are configured, a (destination, pool) pair, so the mail of one pool never waits behind
  another pool's head message when that pool is at its shaping limits (issue 13: limits hold per (source,
  destination), so each pool's queue to a destination progresses on its own);
- a heap of deferred recipients ordered by their next attempt time;
- jobs in flight, each with a lease; at most `destination_concurrency` jobs per destination at once;
- destination backoff: a destination whose last jobs were all deferred waits as a whole ("held off"); the
  changes are journaled (`backoff_journal`) and written with the next spool transaction, and restored at start;
- workers with credits (schemas docstring: credit-based flow control), re-established from facts on every
  heartbeat: the worker's `free` minus the jobs sent to it that it cannot have counted yet (in transit); between
  heartbeats one is spent per job dispatched and one comes back per Result;
- locked messages (`lock`/`unlock`, held by ledger.py while a change to them is decided and committed):
  their recipients are neither dispatched nor promoted until unlocked.

Job ownership, also from facts (ARCHITECTURE.md contract 2): every heartbeat lists the jobs the worker holds.
A listed job the shard had taken back (the worker was silent, e.g. a pause or a network cut) is adopted again
when none of its recipients was handed out since; any other listed job the worker does not own is revoked (the
worker must not start it). A registration is an incarnation (a number new at every registration), so a `seen`
count from an earlier registration never takes back jobs of the new one. Silence is judged on when the
worker's last message was sent (its own clock, mapped onto ours by the quickest message), not when we read it.

Possible duplicates: a job taken back from a silent worker or an expired lease after its Deliver was sent may
have been delivered. Its recipients are marked doubtful; handing one out again counts one possible duplicate
(`possible_duplicates`). A late Result of such a job is reconciled: its outcomes stand for every recipient not
handed out again, so they are not delivered twice.

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
from cluster.queue.shaping import Shaper

MESSAGE_STATE_ORDER = (State.IN_FLIGHT, State.READY, State.DEFERRED, State.HELD)
# The states as module constants: an enum member looked up on its class (State.READY) costs ~0.35 us on
# Python 3.11 (EnumType's __getattr__ slows every class attribute), and the scheduler looks several up per
# recipient change.
_READY, _DEFERRED, _IN_FLIGHT, _HELD = State.READY, State.DEFERRED, State.IN_FLIGHT, State.HELD
_DELIVERED, _FAILED = State.DELIVERED, State.FAILED
# Between the domain and the pool in a lane's name ("gmail.com\x00bulk"); a lane without a pool is the domain.
LANE_SEPARATOR = "\x00"


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
    # Number of the Deliver that carried this job to its worker (0 = not sent yet), within the worker's
    # incarnation; see bus/schemas.py.
    seq: int = 0
    incarnation: int = 0
    # The worker listed it in a heartbeat: it holds (or held) the job, whatever the Deliver numbering says.
    confirmed: bool = False
    # The traffic shaping bucket the job counts in (shaping.py), "" without shaping, and the egress source
    # shaping chose for it ("" = no pool: the worker's default address).
    bucket: str = ""
    source: str = ""


# Drift allowed between a worker's clock and ours when mapping its send times onto our clock (seconds per
# second): far above real clock drift, far below any delay worth noticing.
CLOCK_DRIFT = 1e-3
# Jobs taken back are remembered (for adoption and late Results) up to this many, oldest forgotten first.
TAKEN_BACK_MEMORY = 50_000


@dataclass
class WorkerState:
    name: str
    identity: bytes
    credits: int
    # When the worker last sent something, on our clock.
    last_seen: float
    incarnation: int = 0
    jobs: set[str] = field(default_factory=set)
    # seq of the last Deliver numbered for this incarnation, and of the last one handed to the socket (acks
    # tell the worker the latter: a Deliver numbered at or below it that it never got was lost on the wire).
    last_seq: int = 0
    sent_seq: int = 0
    # Our clock minus the worker's, from its quickest message so far (None before its first timed message).
    clock_offset: float | None = None
    offset_at: float = 0.0

    def sent_at(self, sent: float | None, now: float) -> float:
        """When a message stamped `sent` (worker clock) left the worker, on our clock; `now` if unstamped.

        The smallest (receive time - send stamp) seen is the clock offset plus the quickest transit; a message
        read late (a backlog after a pause) then maps to when it was sent, not when we got round to it.
        """
        if sent is None:
            return now
        observed = now - sent
        if self.clock_offset is None:
            self.clock_offset = observed
        else:
            self.clock_offset = min(observed, self.clock_offset + CLOCK_DRIFT * max(0.0, now - self.offset_at))
        self.offset_at = now
        return min(now, sent + self.clock_offset)


@dataclass
class HeartbeatOutcome:
    """What one heartbeat changed; the shard answers `incarnation`, `last_seq` and `revoked` in its ack."""

    incarnation: int
    last_seq: int
    registered: bool = False
    # Jobs the worker received and no longer holds, without a Result: ready again (never delivered).
    returned: list[Job] = field(default_factory=list)
    # Jobs taken back earlier that the worker still holds: its own again.
    adopted: list[str] = field(default_factory=list)
    # Jobs the worker lists that are not its own (finished, or handed out again): it must not start them,
    # and forgets their Results.
    revoked: list[str] = field(default_factory=list)
    # Finished jobs whose Result never reached us: the worker sends it again.
    resend: list[str] = field(default_factory=list)


@dataclass
class ResultDecision:
    """What a Result decides: `job.indices` are the recipients its outcomes stand for (in flight, for the
    caller to record). For a job taken back earlier, `duplicates` are the recipients handed out again meanwhile
    (delivered twice if the Result says delivered); `stale` tells the two cases apart."""

    job: Job
    duplicates: list[int]
    stale: bool = False


@dataclass(frozen=True)
class SchedulerLimits:
    destination_concurrency: int
    max_recipients: int
    lease_time: float
    worker_timeout: float
    # Consecutive fully deferred jobs after which a destination is backed off as a whole.
    backoff_after: int = 3


class BackoffJournal:
    """Destination backoff changes not yet in the spool (domain -> until, 0.0 = ended); every spool transaction
    takes them (commit.py), so a backoff survives a restart together with the deferrals that caused it."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}

    def record(self, domain: str, until: float) -> None:
        self.pending[domain] = until

    def take(self) -> dict[str, float]:
        taken, self.pending = self.pending, {}
        return taken

    def give_back(self, changes: dict[str, float]) -> None:
        """A transaction that carried `changes` failed: write them with the next one (unless changed since)."""
        for domain, until in changes.items():
            self.pending.setdefault(domain, until)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, job_prefix: str = "", shaper: Shaper | None = None) -> None:
        self.limits = limits
        # Traffic shaping (shaping.py): per-destination concurrency, rates, suspensions and job sizes. Without
        # it, `destination_concurrency` and `max_recipients` of the limits apply to every destination.
        self.shaper = shaper
        # With egress pools, ready queues are per (destination, pool) lane (see the module docstring).
        self._pooled = shaper is not None and shaper.uses_pools
        self.messages: dict[str, Message] = {}
        self.jobs: dict[str, Job] = {}
        self.workers: dict[str, WorkerState] = {}
        self.recipient_counts: Counter[State] = Counter()
        self.message_counts: Counter[State] = Counter()
        self.leases_expired = 0
        # Most messages held since the last shrink; `shrunk` tells the caller memory may be given back.
        self._peak_messages = 0
        self.shrunk = False
        self._per_message: dict[str, Counter[State]] = {}
        # Ready queues by lane (a domain, or "domain\x00pool"), in round-robin order in `_domains`.
        self._ready: dict[str, deque[str]] = {}
        # The queue ids in each lane's ready queue (no (lane, queue id) tuple per message: memory).
        self._queued: dict[str, set[str]] = {}
        self._domains: deque[str] = deque()
        self._deferred: list[tuple[float, str, int]] = []
        self._in_flight_per_domain: Counter[str] = Counter()
        self._deferred_streak: Counter[str] = Counter()
        self.backoff_until: dict[str, float] = {}
        self.backoff_journal = BackoffJournal()
        self._locked: set[str] = set()
        self._job_ids = itertools.count(1)
        self._job_prefix = job_prefix
        self._worker_cursor = 0
        self._incarnations = itertools.count(1)
        self._taken_back: dict[str, Job] = {}
        self._doubtful: set[tuple[str, int]] = set()
        self.possible_duplicates = 0
        # Messages stored with their pending recipients already marked in flight (dispatch.py: `Dispatcher.expects`)
        # and not dispatched since: queue id -> body, kept from the Inject for the first Deliver. Taking a lock on
        # the message or removing it forgets it (what the spool says may have changed since).
        self.fresh: dict[str, bytes] = {}
        self.fresh_bytes = 0

    # -- messages and recipient states --------------------------------------------------------------------

    def add_message(self, message: Message) -> None:
        """Track a stored message; its recipients keep the states they have (done ones are ignored)."""
        self.messages[message.queue_id] = message
        self._peak_messages = max(self._peak_messages, len(self.messages))
        if len(message.recipients) == 1 and message.recipients[0].state is _READY:
            # the common case (and a million times at a restart): what set_state does, without its detours
            recipient = message.recipients[0]
            self.recipient_counts[_READY] += 1
            self.message_counts[_READY] += 1
            recipient.next_attempt = 0.0
            self._enqueue(self._lane(recipient.domain, message), message.queue_id)
            return
        if len(message.recipients) == 1:
            recipient = message.recipients[0]
            if not recipient.state.done:
                state = recipient.state
                recipient.state = _DELIVERED  # counted as nothing until set_state counts it
                self.set_state(message, recipient, state, recipient.next_attempt)
            return
        # Several recipients (100 for a bulk message): what set_state does for each, counted once per message.
        counts: Counter[State] = Counter()
        self._per_message[message.queue_id] = counts
        queue_id = message.queue_id
        for recipient in message.recipients:
            state = recipient.state
            if state is _DELIVERED or state is _FAILED:
                continue
            counts[state] += 1
            if state is _READY:
                recipient.next_attempt = 0.0
                self._enqueue(self._lane(recipient.domain, message), queue_id)
            elif state is _DEFERRED:
                heapq.heappush(self._deferred, (recipient.next_attempt, queue_id, recipient.index))
        self.recipient_counts.update(counts)
        message_state = _message_state(counts)
        if message_state is not None:
            self.message_counts[message_state] += 1

    def remove_message(self, queue_id: str) -> Message | None:
        self.take_fresh(queue_id)
        message = self.messages.pop(queue_id, None)
        if message is None:
            return None
        if self._doubtful:
            for recipient in message.recipients:
                self._doubtful.discard((queue_id, recipient.index))
        if len(self.messages) < self._peak_messages // 4:
            self._shrink()
        counts = self._per_message.pop(queue_id, None)
        if counts is None:
            counts = Counter(r.state for r in message.recipients if not r.state.done)
        for state, count in counts.items():
            self.recipient_counts[state] -= count
        old = _message_state(counts)
        if old is not None:
            self.message_counts[old] -= 1
        return message

    def _shrink(self) -> None:
        """A dict keeps the table of its largest size: after draining to a quarter, rebuild it (in place, as
        other parts hold `messages`) so the memory of a million drained messages is given back."""
        kept = dict(self.messages)
        self.messages.clear()
        self.messages.update(kept)
        self._peak_messages = len(kept)
        self.shrunk = True

    def set_state(self, message: Message, recipient: Recipient, state: State, next_attempt: float = 0.0) -> None:
        # Per-state counts of each message with several recipients; a message with one recipient (most of
        # them) is in its recipient's state, and costs no counter (memory: ARCHITECTURE.md performance notes).
        # (done states by identity, not the `done` property: this runs several times per recipient)
        old = recipient.state
        old_pending = old is not _DELIVERED and old is not _FAILED
        new_pending = state is not _DELIVERED and state is not _FAILED
        counts = self._per_message.get(message.queue_id)
        if counts is None:
            old_message_state = old if old_pending else None
            new_message_state = state if new_pending else None
            if old_pending:
                self.recipient_counts[old] -= 1
            recipient.state = state
            if new_pending:
                self.recipient_counts[state] += 1
        else:
            old_message_state = _message_state(counts)
            if old_pending:
                counts[old] -= 1
                self.recipient_counts[old] -= 1
            recipient.state = state
            if new_pending:
                counts[state] += 1
                self.recipient_counts[state] += 1
            new_message_state = _message_state(counts)
        if old_message_state != new_message_state:
            if old_message_state is not None:
                self.message_counts[old_message_state] -= 1
            if new_message_state is not None:
                self.message_counts[new_message_state] += 1
        if state is _READY:
            recipient.next_attempt = 0.0
            self._enqueue(self._lane(recipient.domain, message), message.queue_id)
        elif state is _DEFERRED:
            recipient.next_attempt = next_attempt
            heapq.heappush(self._deferred, (next_attempt, message.queue_id, recipient.index))

    def _ready_to_in_flight(self, message: Message, ready: list[Recipient]) -> None:
        """`set_state(message, r, IN_FLIGHT)` for each of `ready` (all READY), the counts moved once."""
        counts = self._per_message.get(message.queue_id)
        if counts is None or len(ready) == 1:
            for recipient in ready:
                self.set_state(message, recipient, _IN_FLIGHT)
            return
        old_message_state = _message_state(counts)
        for recipient in ready:
            recipient.state = _IN_FLIGHT
        moved = len(ready)
        counts[_READY] -= moved
        counts[_IN_FLIGHT] += moved
        self.recipient_counts[_READY] -= moved
        self.recipient_counts[_IN_FLIGHT] += moved
        if old_message_state is not _IN_FLIGHT:  # in flight comes first: the message is in flight now
            if old_message_state is not None:
                self.message_counts[old_message_state] -= 1
            self.message_counts[_IN_FLIGHT] += 1

    def _lane(self, domain: str, message: Message) -> str:
        """The ready queue a recipient of `message` at `domain` waits in: the domain, or with egress pools
        configured and a pool chosen for the message, the (domain, pool) lane."""
        if self._pooled:
            pool = message.pool
            if pool:
                return f"{domain}{LANE_SEPARATOR}{pool}"
        return domain

    def _enqueue(self, lane: str, queue_id: str) -> None:
        queued = self._queued.get(lane)
        if queued is None:
            queued = self._queued[lane] = set()
        elif queue_id in queued:
            return
        queued.add(queue_id)
        queue = self._ready.get(lane)
        if queue is None:
            queue = self._ready[lane] = deque()
            self._domains.append(lane)
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
            if recipient.state is _DEFERRED and recipient.next_attempt == when:
                self.set_state(message, recipient, _READY)
                promoted += 1
        for entry in postponed:
            heapq.heappush(self._deferred, entry)
        return promoted

    # -- locks (ledger.py) --------------------------------------------------------------------------------

    def lock(self, queue_id: str) -> None:
        """A change to this message is being decided and committed: leave its recipients alone."""
        self._locked.add(queue_id)
        self.take_fresh(queue_id)

    def unlock(self, queue_id: str) -> None:
        """The change is over: ready recipients can be dispatched again (the caller wakes the dispatcher)."""
        self._locked.discard(queue_id)
        message = self.messages.get(queue_id)
        if message is not None:
            for recipient in message.recipients:
                if recipient.state is _READY:
                    self._enqueue(self._lane(recipient.domain, message), queue_id)

    def is_locked(self, queue_id: str) -> bool:
        return queue_id in self._locked

    # -- messages stored in flight (dispatch.py) ------------------------------------------------------------

    def keep_fresh(self, queue_id: str, body: bytes) -> None:
        """`queue_id` was stored with its pending recipients in flight; its first job needs no mark and no read."""
        self.fresh[queue_id] = body
        self.fresh_bytes += len(body)

    def take_fresh(self, queue_id: str) -> bytes | None:
        """The body kept by `keep_fresh` (forgotten now), or None: the spool's state must be written first."""
        body = self.fresh.pop(queue_id, None)
        if body is not None:
            self.fresh_bytes -= len(body)
        return body

    def has_room(self, domains: set[str], now: float) -> bool:
        """Whether recipients of `domains` made ready now would be dispatched at once: workers have more credits
        than there are ready recipients, and no destination of them is held off or at its concurrency."""
        credits = sum(w.credits for w in self.workers.values())
        if credits <= self.recipient_counts[_READY]:
            return False
        for domain in domains:
            if self.backoff_until.get(domain, 0.0) > now:
                return False
            if self.shaper is None and self._in_flight_per_domain[domain] >= self.limits.destination_concurrency:
                return False
        return True

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
            job.incarnation = worker.incarnation
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
            lane = self._domains[0]
            self._domains.rotate(-1)
            domain, _, pool = lane.partition(LANE_SEPARATOR)
            if self.shaper is None and self._in_flight_per_domain[domain] >= self.limits.destination_concurrency:
                continue
            if self.backoff_until.get(domain, 0.0) > now:
                continue
            source = ""
            if self.shaper is not None:
                # The source is chosen here, for the lane's pool (the pool of every message in it), so the
                # limits hold per (source, destination) in the shard that owns the destination. A pool at its
                # limits holds back only its own lane: the destination's other lanes go on.
                chosen = self.shaper.choose(domain, now, pool)
                if chosen is None:
                    continue  # rate-limited or suspended: the mail stays ready, no attempt is counted
                source = chosen
            head = self._head(lane, domain)
            if head is None:
                self._drop_lane_if_idle(lane)
                continue
            job = self._job_from(lane, domain, *head)
            if self.shaper is not None:
                job.bucket = self.shaper.started(domain, now, source)
                job.source = source
            return job
        return None

    def _head(self, lane: str, domain: str) -> tuple[Message, list[Recipient]] | None:
        """The first message of `lane`'s ready queue with ready recipients at `domain`, and those recipients;
        messages before it that are locked (`unlock` queues them again) or have none are dropped."""
        queue = self._ready[lane]
        while queue:
            queue_id = queue[0]
            message = None if queue_id in self._locked else self.messages.get(queue_id)
            ready = [] if message is None else [
                r for r in message.recipients if r.state is _READY and r.domain == domain]
            if message is not None and ready:
                return message, ready
            queue.popleft()
            self._queued[lane].discard(queue_id)
        return None

    def _job_from(self, lane: str, domain: str, message: Message, ready: list[Recipient]) -> Job:
        max_recipients = (self.limits.max_recipients if self.shaper is None
                          else self.shaper.limits(domain).max_recipients)
        queue_id = message.queue_id
        if len(ready) <= max_recipients:
            self._ready[lane].popleft()
            self._queued[lane].discard(queue_id)
        chosen = ready[:max_recipients]
        job = Job(f"{self._job_prefix}{next(self._job_ids)}", queue_id, domain, [r.index for r in chosen],
                  attempt=max(r.attempts for r in chosen) + 1)
        self._ready_to_in_flight(message, chosen)
        if self._doubtful:
            for recipient in chosen:
                if (queue_id, recipient.index) in self._doubtful:
                    self._doubtful.discard((queue_id, recipient.index))
                    self.possible_duplicates += 1
        self.jobs[job.job_id] = job
        self._in_flight_per_domain[domain] += 1
        self._drop_lane_if_idle(lane)
        return job

    def _drop_lane_if_idle(self, lane: str) -> None:
        if not self._ready[lane]:
            del self._ready[lane]
            self._queued.pop(lane, None)
            self._domains.remove(lane)

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
        if self.shaper is not None and job.bucket:
            self.shaper.finished(job.bucket, job.source)
        worker = self.workers.get(job.worker)
        if worker is not None:
            worker.jobs.discard(job_id)
            worker.credits += 1
        return job

    def return_job(self, job_id: str, doubtful: bool = False) -> Job | None:
        """Put a job's recipients that are still in flight back to ready (vanished worker, expired lease).

        `doubtful`: the worker may have delivered it (its Deliver was sent and it never said otherwise); the
        job is remembered for adoption and a late Result, and its recipients count as possible duplicates when
        they are handed out again.
        """
        job = self.finish_job(job_id)
        if job is None:
            return None
        message = self.messages.get(job.queue_id)
        if message is not None:
            for index in job.indices:
                recipient = message.recipients[index]
                if recipient.state is _IN_FLIGHT:
                    self.set_state(message, recipient, _READY)
                    if doubtful:
                        self._doubtful.add((job.queue_id, index))
        if doubtful:
            self._remember_taken_back(job)
        return job

    def _remember_taken_back(self, job: Job) -> None:
        self._taken_back[job.job_id] = job
        while len(self._taken_back) > TAKEN_BACK_MEMORY:
            del self._taken_back[next(iter(self._taken_back))]

    def _ready_recipients_of(self, job: Job) -> tuple[Message | None, list[int]]:
        message = self.messages.get(job.queue_id)
        if message is None or job.queue_id in self._locked:  # a locked message is someone else's to change
            return message, []
        return message, [i for i in job.indices if message.recipients[i].state is _READY]

    def _adopt(self, job_id: str, worker: WorkerState, now: float) -> bool:
        """A worker still holds a job we took back: it is its own again if no recipient was handed out since."""
        job = self._taken_back.get(job_id)
        if job is None:
            return False
        message, ready = self._ready_recipients_of(job)
        if message is None or len(ready) != len(job.indices):
            return False
        del self._taken_back[job_id]
        for index in job.indices:
            self.set_state(message, message.recipients[index], _IN_FLIGHT)
            self._doubtful.discard((job.queue_id, index))
        job.worker = worker.name
        job.incarnation = worker.incarnation
        job.lease_until = now + self.limits.lease_time
        job.confirmed = True
        self.jobs[job_id] = job
        worker.jobs.add(job_id)
        self._in_flight_per_domain[job.domain] += 1
        return True

    def stale_result(self, job_id: str) -> ResultDecision | None:
        """A Result for a job we took back; None when the job is unknown (finished, or long forgotten).

        Recipients still ready take the Result's outcomes (they go in flight until the caller records them);
        the others were handed out again, so a delivery reported here for them is a duplicate.
        """
        job = self._taken_back.pop(job_id, None)
        if job is None:
            return None
        message, ready = self._ready_recipients_of(job)
        if message is None:
            return None
        for index in ready:
            self.set_state(message, message.recipients[index], _IN_FLIGHT)
            self._doubtful.discard((job.queue_id, index))
        decided = Job(job.job_id, job.queue_id, job.domain, ready, job.attempt, job.worker, job.assigned_at,
                      source=job.source)
        return ResultDecision(decided, [i for i in job.indices if i not in ready], stale=True)

    def in_flight_jobs_of(self, domain: str) -> int:
        return self._in_flight_per_domain[domain]

    # -- destination backoff ------------------------------------------------------------------------------

    def note_destination(self, domain: str, all_deferred: bool, now: float, backoff: float) -> bool:
        """Record how a job to `domain` ended; returns True when the destination is now backed off."""
        if not all_deferred:
            self._deferred_streak.pop(domain, None)
            if self.backoff_until.pop(domain, None) is not None:
                self.backoff_journal.record(domain, 0.0)
            return False
        self._deferred_streak[domain] += 1
        if self._deferred_streak[domain] >= self.limits.backoff_after:
            self.backoff_until[domain] = now + backoff
            self.backoff_journal.record(domain, now + backoff)
            return True
        return False

    def clear_backoff(self, domain: str | None = None) -> int:
        """Serve a backed-off destination (or all, for None) again now; returns how many were backed off."""
        over = [d for d in self.backoff_until if domain is None or d == domain]
        for name in over:
            del self.backoff_until[name]
            self.backoff_journal.record(name, 0.0)
        return len(over)

    def end_backoffs(self, now: float) -> bool:
        """Forget backoffs that are over; True when some destination may be served again."""
        over = [domain for domain, until in self.backoff_until.items() if until <= now]
        for domain in over:
            del self.backoff_until[domain]
            self.backoff_journal.record(domain, 0.0)
        return bool(over)

    def restore_backoffs(self, stored: dict[str, float], now: float) -> None:
        """The backoffs read back from the spool at start: those not over yet hold their destination off again
        (one more fully deferred job renews them); the others are deleted with the next transaction."""
        for domain, until in stored.items():
            if until > now:
                self.backoff_until[domain] = until
                self._deferred_streak[domain] = self.limits.backoff_after
            else:
                self.backoff_journal.record(domain, 0.0)

    def held_off_until(self, domain: str) -> float | None:
        """When a held-off destination is served again, or None when it is not held off."""
        return self.backoff_until.get(domain)

    def held_off_messages(self) -> int:
        """Messages waiting (ready) behind a destination backoff."""
        if not self._pooled:
            return sum(len(self._ready.get(domain, ())) for domain in self.backoff_until)
        return sum(len(queue) for lane, queue in self._ready.items()
                   if lane.partition(LANE_SEPARATOR)[0] in self.backoff_until)

    # -- workers ------------------------------------------------------------------------------------------

    def heartbeat(self, name: str, identity: bytes, free: int, in_flight: list[str], now: float,
                  seen: int = 0, incarnation: int = 0, sent: float | None = None,
                  finished: list[str] | None = None) -> HeartbeatOutcome:
        """Register or renew a worker from the facts it reports (see the module docstring).

        `in_flight`: jobs the worker holds and has not finished; `finished`: jobs whose Result it sent and keeps
        until told to forget it (revoked) or to send it again (resend: we never got it, e.g. a network cut).
        `seen`: the highest Deliver seq the worker has received or been told was sent, counted in the
        registration `incarnation` (the caller passes seen=0 when it belongs to another shard epoch). A job the
        worker does not list and cannot have missed (seq <= seen, or listed before) goes back to ready: never
        a job still on the wire. `sent`: the worker's clock when it sent the heartbeat.
        """
        worker = self.workers.get(name)
        registered = worker is None
        if worker is None:
            worker = self.workers[name] = WorkerState(name, identity, 0, now, next(self._incarnations))
        worker.identity = identity
        worker.last_seen = max(worker.last_seen, worker.sent_at(sent, now))
        if incarnation != worker.incarnation:
            seen = 0
        outcome = HeartbeatOutcome(worker.incarnation, worker.sent_seq, registered)
        finished = finished or []
        for job_id in in_flight:
            if job_id in worker.jobs:
                self._renew(self.jobs[job_id], now)
            elif self._adopt(job_id, worker, now):
                outcome.adopted.append(job_id)
            else:
                outcome.revoked.append(job_id)
        for job_id in finished:
            if job_id in worker.jobs:
                self._renew(self.jobs[job_id], now)
                outcome.resend.append(job_id)
            elif job_id in self._taken_back:
                outcome.resend.append(job_id)
            else:
                outcome.revoked.append(job_id)
        listed = {*in_flight, *finished}
        in_transit = 0
        for job_id in list(worker.jobs):
            if job_id in listed:
                continue
            job = self.jobs[job_id]
            if job.confirmed or 0 < job.seq <= seen:
                taken_back = self.return_job(job_id)
                if taken_back is not None:
                    outcome.returned.append(taken_back)
            else:
                in_transit += 1
        worker.credits = max(0, free - in_transit)
        return outcome

    def _renew(self, job: Job, now: float) -> None:
        job.lease_until = now + self.limits.lease_time
        job.confirmed = True

    def next_seq(self, job: Job) -> int:
        """Number the Deliver about to carry `job` to its worker (in the worker's current incarnation)."""
        worker = self.workers[job.worker]
        worker.last_seq += 1
        job.seq = worker.last_seq
        job.incarnation = worker.incarnation
        return job.seq

    def note_sent(self, job: Job) -> None:
        """The Deliver numbered `job.seq` was handed to the socket (so an ack sent later follows it)."""
        worker = self.workers.get(job.worker)
        if worker is not None and worker.incarnation == job.incarnation:
            worker.sent_seq = max(worker.sent_seq, job.seq)

    def take_result(self, job_id: str, worker: str) -> ResultDecision | None:
        """The job a Result decides, or None (unknown, long forgotten, or not this worker's).

        A live job is finished (its credit comes back); a job taken back earlier is reconciled (stale_result).
        The returned job's recipients are in flight; the caller records their outcomes.
        """
        job = self.jobs.get(job_id)
        if job is not None:
            if job.worker != worker:
                return None
            self.finish_job(job_id)
            return ResultDecision(job, [])
        return self.stale_result(job_id)

    def seen(self, name: str, identity: bytes, now: float, sent: float | None = None) -> None:
        """A worker sent something: it is alive, and replies go to its current socket."""
        worker = self.workers.get(name)
        if worker is not None:
            worker.identity = identity
            worker.last_seen = max(worker.last_seen, worker.sent_at(sent, now))

    def excuse(self, seconds: float) -> None:
        """The shard itself was stalled (paused, or its event loop blocked) for `seconds`: that time counts
        neither as the workers' silence nor against their leases (what they sent meanwhile may not be readable
        yet: ZeroMQ's I/O thread has to catch up first)."""
        for worker in self.workers.values():
            worker.last_seen += seconds
        for job in self.jobs.values():
            job.lease_until += seconds

    def expire(self, now: float) -> list[Job]:
        """Take back jobs of silent workers (worker_timeout) and jobs whose lease ran out.

        Call it only after every message waiting to be read was handled: silence is judged on what was sent.
        """
        returned: list[Job] = []
        for name, worker in list(self.workers.items()):
            if now - worker.last_seen >= self.limits.worker_timeout:
                del self.workers[name]
                for job_id in list(worker.jobs):
                    job = self.return_job(job_id, doubtful=self.jobs[job_id].seq > 0)
                    if job is not None:
                        returned.append(job)
        for job_id, job in list(self.jobs.items()):
            if job.lease_until <= now:
                taken_back = self.return_job(job_id, doubtful=job.seq > 0)
                if taken_back is not None:
                    returned.append(taken_back)
        self.leases_expired += len(returned)
        return returned


def _message_state(counts: Counter[State]) -> State | None:
    get = counts.get  # not counts[state]: a missing key would go through Counter.__missing__, in Python
    for state in MESSAGE_STATE_ORDER:
        if get(state, 0) > 0:
            return state
    return None
