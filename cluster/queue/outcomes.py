"""Outcomes of delivery attempts: what a worker's Result means for each recipient, and the retry decision.

Inputs: the finished Job (workers.py) and the Result's outcomes, one per recipient (cluster/bus/schemas.py).
Outputs: one `Change` per recipient of the job, recorded through the ledger (ledger.py): delivered, failed
(bounced), deferred until the next attempt of the retry schedule (retry.py), or expired (4.4.7) once the
message is older than `queue.max_lifetime`; and the destination backoff (`Scheduler.note_destination`)
when every recipient of the job was deferred for a reason that concerns the whole destination.
Also: what the replies teach traffic shaping (shaping.py: the MX host that answered, reaction rules matched
by deferrals and failures), and hard bounces go on the suppression list (suppression.py) when it is on.
Failure modes: a recipient the worker did not report is deferred (451 4.4.0); a spool error while recording
leaves the recipients ready for another attempt (ledger.py) and is logged; so is a suppression list that
cannot be written (the address is then simply not suppressed).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Coroutine
from typing import Any

from cluster.bus.schemas import Outcome, OutcomeKind
from cluster.queue import metrics
from cluster.queue.ledger import Change, Event, Ledger, copy_recipient
from cluster.queue.records import LastOutcome, Message, Recipient, State
from cluster.queue.retry import EXPIRED_STATUS, RetrySchedule
from cluster.queue.scheduler import Job, Scheduler
from cluster.queue.spool import SpoolError
from cluster.queue.suppression import SUPPRESSING, SuppressionList, classify

log = logging.getLogger("mtacluster.queue")

IN_FLIGHT = frozenset({State.IN_FLIGHT})
# Module constants for what is asked per recipient (an enum member looked up on its class costs ~0.35 us on
# Python 3.11).
_DELIVERED_KIND, _FAILED_KIND = OutcomeKind.DELIVERED, OutcomeKind.FAILED
_DELIVERED, _FAILED = State.DELIVERED, State.FAILED
_SENT, _BOUNCED = Event.SENT, Event.BOUNCED
# Outcomes wait up to this long (seconds) for a spool transaction to ride along with (commit.py): under load the
# next store takes them, one fsync for both; a crash meanwhile leaves their recipients in flight, to be delivered
# again as counted possible duplicates (ARCHITECTURE.md contract 2), as a crash during any commit would.
OUTCOME_COMPANY = 0.02


class OutcomeRecorder:
    def __init__(self, index: int, scheduler: Scheduler, retry: RetrySchedule, ledger: Ledger,
                 spawn: Callable[[Coroutine[Any, Any, None]], None],
                 suppression: SuppressionList | None = None) -> None:
        self.index = index
        self.suppression = suppression
        self.scheduler = scheduler
        self.retry = retry
        self.ledger = ledger
        self._spawn = spawn
        # Messages whose outcomes were taken in and wait for the next ledger pass (insertion-ordered), the
        # latest time one of them arrived, and whether the task that records them runs (`_flush`).
        self._pending: dict[str, None] = {}
        self._pending_now = 0.0
        self._flushing = False

    def record(self, job: Job, outcomes: list[Outcome], now: float) -> None:
        """Decide each recipient's next state now, note the destination's health, record in the background."""
        message = self.scheduler.messages.get(job.queue_id)
        if message is None:
            return
        reported = {o.recipient.lower(): o for o in outcomes}
        changes: list[Change] = []
        for index in job.indices:
            recipient = message.recipients[index]
            outcome = reported.get(recipient.address.lower()) or Outcome(
                recipient.address, OutcomeKind.DEFERRED, 451, "4.4.0",
                "the worker returned no outcome for this recipient")
            change = self.decide(message, recipient, outcome, now)
            change.dispatched_at = job.assigned_at
            change.source = job.source
            changes.append(change)
        self._learn(job, outcomes, now)
        connection_trouble = all(
            change.new.state is State.DEFERRED and _connection_level(reported.get(change.new.address.lower()))
            for change in changes)
        # The backoff (a first retry's delay) is drawn only when it may be used: every recipient deferred.
        backoff = self.retry.delay(1) if connection_trouble else 0.0
        if self.scheduler.note_destination(job.domain, connection_trouble, now, backoff):
            log.warning("shard %d: destination %s backed off after repeated deferrals", self.index, job.domain)
        # Handed to the ledger now, not when the task runs: nothing decided for the message after this
        # moment can overtake them (ledger.py, step 2).
        self.ledger.outcomes_arrived(job.queue_id, changes)
        self._pending[job.queue_id] = None
        self._pending_now = max(self._pending_now, now)
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush())

    def _learn(self, job: Job, outcomes: list[Outcome], now: float) -> None:
        shaper = self.scheduler.shaper
        learnt = ""  # the recipients of a job mostly share the host that answered: learnt once
        for outcome in outcomes:
            if shaper is not None and outcome.remote and outcome.remote != learnt and "[" in outcome.remote:
                shaper.learn_mx(job.domain, outcome.remote.split("[", 1)[0])
                learnt = outcome.remote
            if outcome.kind is _DELIVERED_KIND:
                continue
            reply = f"{outcome.code} {outcome.enhanced} {outcome.text}"
            if shaper is not None and (rule := shaper.react(job.domain, reply, now, job.source)) is not None:
                log.warning("shard %d: destination %s%s: %s for %gs after the reply %r", self.index, job.domain,
                            f" from source {job.source}" if job.source and rule.scope == "source" else "",
                            rule.action, rule.duration, reply[:200])
            if outcome.kind is OutcomeKind.FAILED and self.suppression is not None and self.suppression.enabled:
                category = classify(outcome.code, outcome.enhanced, outcome.text)
                if category in SUPPRESSING:
                    try:
                        self.suppression.add(outcome.recipient, category, reply, now)
                    except (OSError, sqlite3.Error) as exc:
                        log.error("shard %d: cannot record the suppression of %s: %s", self.index,
                                  outcome.recipient, exc)
                        continue
                    metrics.SUPPRESSION_ADDED.labels(category).inc()
                    log.info("shard %d: suppressed %s (%s) after %r", self.index, outcome.recipient, category,
                             reply[:200])

    async def _flush(self) -> None:
        """Commit the outcomes taken in, every message's in one ledger pass (one spool transaction); those that
        arrive meanwhile go in the next pass, until none is left."""
        try:
            while self._pending:
                queue_ids, now = list(self._pending), self._pending_now
                self._pending.clear()
                self._pending_now = 0.0
                with contextlib.suppress(SpoolError):  # logged by the ledger; the recipients are ready again
                    await self.ledger.apply(queue_ids, _nothing_more, now, OUTCOME_COMPANY)
        finally:
            self._flushing = False

    def decide(self, message: Message, recipient: Recipient, outcome: Outcome, now: float) -> Change:
        """The recipient's next state after an outcome (the typed outcome is kept as it came)."""
        attempts = recipient.attempts + 1
        last = LastOutcome.of(outcome)
        if outcome.kind is _DELIVERED_KIND:
            return Change(copy_recipient(recipient, _DELIVERED, attempts=attempts, last=last), IN_FLIGHT,
                          _SENT, outcome=outcome)
        if outcome.kind is _FAILED_KIND:
            return Change(copy_recipient(recipient, _FAILED, attempts=attempts, last=last), IN_FLIGHT,
                          _BOUNCED, bounce=True, outcome=outcome)
        decision = self.retry.after_deferral(attempts, message.arrival, now)
        if decision.give_up:
            # RFC 3463 4.4.7: delivery time expired; the last error stays readable in the text.
            expired = LastOutcome(OutcomeKind.EXPIRED, outcome.code, EXPIRED_STATUS,
                                  f"delivery time expired; last error: {last.reply}", outcome.remote)
            return Change(copy_recipient(recipient, State.FAILED, attempts=attempts, last=expired), IN_FLIGHT,
                          Event.EXPIRED, bounce=True, outcome=outcome)
        return Change(copy_recipient(recipient, State.DEFERRED, attempts=attempts, next_attempt=decision.next_attempt,
                                     last=last), IN_FLIGHT, Event.DEFERRED, outcome=outcome)


def _nothing_more(message: Message) -> list[Change]:
    """Outcome recording decides nothing beyond the outcomes themselves (they go first: ledger.py, step 2)."""
    return []


def _connection_level(outcome: Outcome | None) -> bool:
    """A deferral that says nothing about one recipient: no server answered, it closed (421), or a
    network/routing problem (RFC 3463 4.4.x). Only these back off a whole destination."""
    if outcome is None:
        return True
    return not outcome.remote or outcome.code == 421 or outcome.enhanced.startswith("4.4.")
