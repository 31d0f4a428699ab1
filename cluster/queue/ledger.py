"""The one place where recipient states change durably: decide under a message lock, commit, then apply.

Every change that must survive a crash (an outcome from a worker, an admin hold/release/flush/delete/bounce)
goes through `Ledger.apply(queue_ids, decide)`:
1. the messages are locked (`MessageLocks`): no other change is decided for them, and the scheduler neither
   dispatches nor promotes their recipients, until step 4 (so two admin runs, or an admin run and the
   dispatcher, never act on the same recipient twice);
2. the workers' outcomes that arrived for these messages and are not committed yet (`outcomes_arrived`) go
   first, in a transaction of their own (steps 3 and 4): whatever is decided for a message is decided after
   every outcome that arrived before it, so an admin delete cannot take a recipient whose delivery was
   already reported (its `status=sent` line would be lost: the worker did deliver it);
3. `decide(message)` returns the changes, computed from the state as it is now; a change whose recipient is
   no longer in one of its `expected` states is dropped (someone else got there first), and a worker's
   outcome dropped so is logged as such, never silently;
4. one spool transaction (through group commit) records every change, removes messages that are done and
   stores one DSN per message for its new failures that ask for one (bounces.py);
5. only then memory follows, metrics count, and each committed change writes its log line (maillog.py: one
   per recipient outcome or admin action, grep-able by queue id): the line is decided by the committed
   change alone, whatever memory shows meanwhile, so every committed outcome has exactly one line. Then the
   locks are released.
A job an admin delete or bounce takes away while it is out (`job_dropped`) may still be delivered by its worker:
its late Result changes nothing, but each delivery it reports is logged (`late_result`), so no delivery goes
without its `status=sent` line.
On a spool error nothing in memory changes except that recipients which were in flight go back to ready
(their job is over), and the SpoolError reaches the caller (an admin request then answers an error).

Inputs: the scheduler (the in-memory queue), the spool (`SpoolIO`), the bounce maker, a callback that wakes
the dispatcher. Outputs: committed changes, the log lines, `mtacluster_queue_outcomes_total{status}` and
`mtacluster_queue_recipients_completed_total{outcome}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from cluster.bus.schemas import Outcome, OutcomeKind
from cluster.logs import direct, flush_direct
from cluster.queue import maillog, metrics
from cluster.queue.bounces import BounceMaker
from cluster.queue.records import LastOutcome, Message, Recipient, RecipientUpdate, State
from cluster.queue.scheduler import Job, Scheduler
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO

log = logging.getLogger("mtacluster.queue")


class Event(enum.StrEnum):
    """What a change means, for the log and the metrics."""

    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    DELETED = "deleted"
    HELD = "held"
    RELEASED = "released"
    FLUSHED = "flushed"

    # The C hash of the string, consistent with a StrEnum's string equality (Enum's own is computed in Python):
    # events are counted per change.
    __hash__ = str.__hash__


# (a module constant: an enum member looked up on its class costs ~0.35 us on Python 3.11; used per change)
_FLUSHED = Event.FLUSHED

# Event -> the `outcome` label of mtacluster_queue_recipients_completed_total, for events that finish a recipient.
COMPLETED_AS = {Event.SENT: "delivered", Event.BOUNCED: "failed", Event.EXPIRED: "expired",
                Event.DELETED: "deleted"}
# Jobs taken away by an admin delete or bounce, remembered for their late Results (oldest forgotten first).
DROPPED_MEMORY = 10_000


@dataclass
class Change:
    """A recipient's next state: `new` is a copy; the live recipient changes only after the commit."""

    new: Recipient
    expected: frozenset[State]
    event: Event
    # Report this recipient in a DSN to the sender when it fails (never for a null sender).
    bounce: bool = False
    # The worker's outcome behind the change (for the log line: relay, port, timings); None for admin changes.
    outcome: Outcome | None = None
    # When the job that led to this change was dispatched (for the log line's delays); 0 for admin changes.
    dispatched_at: float = 0.0
    # The egress source the job left from (for the log line); "" = none (no pool) or an admin change.
    source: str = ""


@dataclass
class Applied:
    """What `Ledger.apply` did: the changes that were committed, per queue id."""

    changes: dict[str, list[Change]] = field(default_factory=dict)
    # Queue ids that were still queued when their lock was taken.
    found: set[str] = field(default_factory=set)

    def count(self) -> int:
        return sum(len(c) for c in self.changes.values())


class MessageLocks:
    """Per-message exclusion for changes that are decided, committed, then applied (module docstring)."""

    def __init__(self, scheduler: Scheduler, wake: Callable[[], None]) -> None:
        self._scheduler = scheduler
        self._wake = wake
        self._released: dict[str, asyncio.Future[None]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, queue_ids: Iterable[str]) -> AsyncIterator[None]:
        wanted = set(queue_ids)
        while busy := [self._released[q] for q in wanted if q in self._released]:
            await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)
        # One future for the whole hold (released together), not one per message: a pass over the outcomes of
        # a whole turn locks many messages at once.
        released = asyncio.get_running_loop().create_future()
        for queue_id in wanted:
            self._released[queue_id] = released
            self._scheduler.lock(queue_id)
        try:
            yield
        finally:
            for queue_id in wanted:
                del self._released[queue_id]
                self._scheduler.unlock(queue_id)
            released.set_result(None)
            self._wake()


class Ledger:
    def __init__(self, label: str, scheduler: Scheduler, io: SpoolIO, bounces: BounceMaker,
                 wake: Callable[[], None]) -> None:
        self.label = label
        self.scheduler = scheduler
        self.io = io
        self.bounces = bounces
        self.locks = MessageLocks(scheduler, wake)
        self._wake = wake
        # Workers' outcomes taken in (the job is over) and not committed yet, per queue id (module docstring).
        self._outcomes: dict[str, list[Change]] = {}
        # job id -> (the job, its message's arrival), for jobs an admin change took away while they were out.
        self._dropped: dict[str, tuple[Job, float]] = {}

    def job_dropped(self, job: Job, arrival: float) -> None:
        """An admin delete or bounce took `job` away (finished) while it was out: its worker may deliver it."""
        self._dropped[job.job_id] = (job, arrival)
        while len(self._dropped) > DROPPED_MEMORY:
            del self._dropped[next(iter(self._dropped))]

    def late_result(self, job_id: str, outcomes: Iterable[Outcome], now: float) -> None:
        """The Result of a job taken away by an admin change: nothing changes, but each delivery it reports
        happened and writes its `status=sent` line."""
        dropped = self._dropped.pop(job_id, None)
        if dropped is None:
            return
        job, arrival = dropped
        for outcome in outcomes:
            if outcome.kind is OutcomeKind.DELIVERED:
                maillog.record(job.queue_id, outcome.recipient, Event.SENT.value, LastOutcome.of(outcome),
                               job.attempt, arrival, now, job.assigned_at, outcome, job.source)
                log.info("%s: to=<%s> was delivered by worker %s after the queue administrator had taken it out of "
                         "the queue", job.queue_id, outcome.recipient, job.worker)

    def outcomes_arrived(self, queue_id: str, changes: list[Change]) -> None:
        """A worker's outcomes for `queue_id`: the next `apply` to that message commits them before anything
        else is decided for it (call it when the Result is taken in, then `apply([queue_id], ...)`)."""
        self._outcomes.setdefault(queue_id, []).extend(changes)

    async def apply(self, queue_ids: Iterable[str], decide: Callable[[Message], list[Change]],
                    now: float, company: float = 0.0) -> Applied:
        """Decide, commit and apply changes to the given messages (module docstring); unknown ids are skipped.
        `company`: the arrived outcomes may wait that long for a transaction to ride along with (commit.py)."""
        wanted = list(dict.fromkeys(queue_ids))
        async with self.locks.hold(wanted):
            arrived = {q: changes for q in wanted if (changes := self._outcomes.pop(q, None))}
            if arrived:
                first = [m for q in arrived if (m := self.scheduler.messages.get(q)) is not None]
                try:
                    await self._commit(first, lambda message: arrived[message.queue_id], now, Applied(), company)
                except SpoolError as exc:
                    log.error("cannot record the outcomes of %s: %s", ", ".join(arrived), exc)
                    raise
            applied = Applied()
            messages = [m for q in wanted if (m := self.scheduler.messages.get(q)) is not None]
            applied.found.update(m.queue_id for m in messages)
            await self._commit(messages, decide, now, applied)
        return applied

    async def _commit(self, messages: list[Message], decide: Callable[[Message], list[Change]], now: float,
                      applied: Applied, company: float = 0.0) -> None:
        """Steps 3 to 5 of the module docstring for locked `messages`; what was committed goes into `applied`."""
        batch = Batch()
        dsns: dict[str, Message] = {}  # original queue id -> its DSN
        for message in messages:
            changes = []
            for change in decide(message):
                live = message.recipients[change.new.index]
                if live.state in change.expected:
                    changes.append(change)
                elif change.outcome is not None:
                    log.warning("%s: to=<%s> is %s already: the worker's outcome (%s, %s) is not recorded",
                                message.queue_id, live.address, live.state.value, change.event.value,
                                change.outcome.code)
            if not changes:
                continue
            applied.changes[message.queue_id] = changes
            finished = {c.new.index for c in changes if c.new.state.done}
            if all(r.state.done or r.index in finished for r in message.recipients):
                batch.removals.append(message.queue_id)  # its rows go: no update of them first
            else:
                batch.updates.extend(RecipientUpdate.of(message.queue_id, c.new) for c in changes)
            failed = [c.new for c in changes if c.bounce and c.new.state is State.FAILED]
            if failed and message.sender:
                headers = await self.io.read_headers(message.queue_id) or b""
                made = self.bounces.build(message, failed, headers, now, "failed")
                if made is not None:
                    batch.add_message(*made)
                    dsns[message.queue_id] = made[0]
        if not batch:
            return
        try:
            await self.io.commit(batch, company)
        except SpoolError:
            self._back_to_ready(messages, applied)
            raise
        for dsn in dsns.values():
            self.bounces.stored(dsn)
        removed = set(batch.removals)
        counts: Counter[Event] = Counter()
        writer = direct(log) if removed else None  # the text line without a log record (cluster/logs.py)
        for message in messages:
            for change in applied.changes.get(message.queue_id, []):
                self._follow(message, change, now)
                counts[change.event] += 1
            if message.queue_id in dsns:
                log.info("%s: sender non-delivery notification: %s", message.queue_id,
                         dsns[message.queue_id].queue_id)
            if message.queue_id in removed:
                self.scheduler.remove_message(message.queue_id)
                if writer is not None:
                    writer.write(log, f"{message.queue_id}: removed")
                else:
                    log.info("%s: removed", message.queue_id)
        flush_direct()  # the lines of what this commit made durable, now (cluster/logs.py)
        for event, count in counts.items():
            outcomes, completed = metrics.outcome_children(self.label, event.value, COMPLETED_AS.get(event))
            outcomes.inc(count)
            if completed is not None:
                completed.inc(count)

    def _follow(self, message: Message, change: Change, now: float) -> None:
        """Memory follows a committed change, and the change writes its log line (maillog.py).

        The line is the committed change's, always (one per committed outcome). Memory cannot have moved
        meanwhile (the message is locked, and outcomes go first), but if it did, the recipient keeps its new
        state: whatever moved it commits after this change."""
        live, new = message.recipients[change.new.index], change.new
        if live.state in change.expected:
            live.attempts, live.last = new.attempts, new.last
            self.scheduler.set_state(message, live, new.state, new.next_attempt)
        else:
            log.warning("%s: to=<%s> is %s in memory, not %s as committed: it keeps that state", message.queue_id,
                        live.address, live.state.value, new.state.value)
        if change.event is not _FLUSHED:  # a flush may touch the whole queue: admin.py logs one line
            maillog.record(message.queue_id, live.address, change.event._value_, new.last, new.attempts,
                           message.arrival, now, change.dispatched_at, change.outcome, change.source)

    def _back_to_ready(self, messages: list[Message], applied: Applied) -> None:
        """A failed commit: recipients whose job is over (in flight, no job any more) are ready again."""
        for message in messages:
            for change in applied.changes.get(message.queue_id, []):
                live = message.recipients[change.new.index]
                if live.state is State.IN_FLIGHT:
                    self.scheduler.set_state(message, live, State.READY)
        self._wake()


def copy_recipient(recipient: Recipient, state: State, *, attempts: int | None = None, next_attempt: float = 0.0,
                   last: LastOutcome | None = None) -> Recipient:
    """A copy of `recipient` in `state`, other fields kept unless given (its domain is not computed again)."""
    new = recipient.clone()
    new.state, new.next_attempt = state, next_attempt
    if attempts is not None:
        new.attempts = attempts
    if last is not None:
        new.last = last
    return new
