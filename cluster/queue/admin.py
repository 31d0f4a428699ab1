"""Admin operations of a shard, answered over AdminRequest(op, args) -> AdminReply(ok, data, error).

    ping    {}                                                 -> {"shard", "epoch", "ready", "state"}  (frontend
                                                                 readiness; state: drain.py's serving/draining/drained)
    list    {domain?: str, deferred_only?: bool, limit?: int}  -> {"messages": [message, ...] (at most limit,
                                                                 oldest first), "total": n (all that match), "limit"}
                                                                 deferred_only: deferred, or held off (below)
    show    {queue_id}                                         -> message + {"headers": str}
    flush   {domain?: str, queue_id?: str}                     -> {"flushed": n}   deferred -> ready now
    hold    {queue_id}                                         -> {"queue_id", "held": n}
    release {queue_id}                                         -> {"queue_id", "released": n}
    delete  {queue_id}                                         -> {"queue_id", "deleted": n}  no DSN
    bounce  {queue_id}                                         -> {"queue_id", "bounced": n}  5.0.0 + DSN
where message = {"queue_id", "sender", "arrival", "size", "recipients": [{"address", "state", "attempts",
"next_attempt", "last", "held_off_until"}]}, held_off_until the time a ready recipient's held-off destination
is served again (else None), and last = None or the typed last outcome {"kind", "code", "enhanced", "text",
"remote"} (records.py: LastOutcome).

Every change goes through the ledger (ledger.py): decided under the message's lock from its state at that
moment, written to the spool, and only then answered, so admin operations are safe against each other and
against the dispatcher (two overlapping flushes make each deferred recipient ready once). A flush of many
messages is cut into chunks whose transactions go through group commit together.
Errors: unknown op, unknown queue id, bad argument raise `AdminError` (the shard answers ok=False with its
text, e.g. "unknown queue id 01ABC", and data {"not_found": true} for an unknown queue id, so the CLI can tell
"not here" from "failed here"); a spool failure raises SpoolError (answered as an error too: the change did
not happen, and the command must say so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from cluster.bus.ring import domain_key
from cluster.bus.schemas import OutcomeKind
from cluster.queue.ledger import Applied, Change, Event, Ledger, copy_recipient
from cluster.queue.records import PENDING_STATES, LastOutcome, Message, Recipient, State
from cluster.queue.scheduler import Scheduler
from cluster.queue.spoolio import SpoolIO

log = logging.getLogger("mtacluster.queue")

DEFAULT_LIST_LIMIT = 10_000
ADMIN_BOUNCE = LastOutcome(OutcomeKind.FAILED, 550, "5.0.0", "Message deleted and returned by the queue administrator")
ADMIN_DELETE = LastOutcome(OutcomeKind.FAILED, 0, "", "deleted by the queue administrator")
# Messages per ledger transaction in a flush; the chunks are committed together through group commit.
FLUSH_CHUNK = 1000

PENDING = frozenset(PENDING_STATES)


class AdminError(ValueError):
    """A request the shard cannot carry out as asked (unknown op or queue id, bad argument)."""

    def __init__(self, text: str, not_found: bool = False) -> None:
        super().__init__(text)
        self.not_found = not_found


def describe(message: Message, held_off: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A message as admin replies show it; `held_off_until` is set for a ready recipient whose destination is
    held off (scheduler.py: destination backoff), the time it is served again."""
    held_off = held_off or {}
    return {
        "queue_id": message.queue_id, "sender": message.sender, "arrival": message.arrival, "size": message.size,
        "recipients": [{"address": r.address, "state": r.state.value, "attempts": r.attempts,
                        "next_attempt": r.next_attempt, "last": None if r.last is None else r.last.as_dict(),
                        "held_off_until": held_off.get(r.domain) if r.state is State.READY else None}
                       for r in message.recipients],
    }


def waiting(recipient: Recipient, held_off: Mapping[str, float]) -> bool:
    """Deferred, or ready behind a held-off destination: what `list --deferred` shows."""
    return recipient.state is State.DEFERRED or (recipient.state is State.READY and recipient.domain in held_off)


def _text_arg(args: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = args.get(name)
    if value is None:
        if required:
            raise AdminError(f"missing argument {name!r}")
        return None
    if not isinstance(value, str) or not value:
        raise AdminError(f"argument {name!r} must be a non-empty string")
    return value


class AdminOps:
    def __init__(self, scheduler: Scheduler, ledger: Ledger, io: SpoolIO, clock: Callable[[], float],
                 wake: Callable[[], None], identity: Callable[[], dict[str, Any]],
                 extra: dict[str, Callable[[dict[str, Any]], Any]] | None = None) -> None:
        # More operations answered by other modules (deliverability_admin.py: suppression, shaping).
        self._extra = extra or {}
        self.scheduler = scheduler
        self.ledger = ledger
        self.io = io
        self.clock = clock
        self._wake = wake
        self._identity = identity

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": self._ping, "list": self._list, "show": self._show, "flush": self._flush, "hold": self._hold,
            "release": self._release, "delete": self._delete, "bounce": self._bounce, **self._extra,
        }
        handler = handlers.get(op)
        if handler is None:
            raise AdminError(f"unknown admin operation {op!r} (known: {', '.join(handlers)})")
        return await handler(args)

    def _message(self, args: dict[str, Any]) -> Message:
        queue_id = _text_arg(args, "queue_id", required=True)
        assert queue_id is not None
        message = self.scheduler.messages.get(queue_id)
        if message is None:
            raise AdminError(f"unknown queue id {queue_id}", not_found=True)
        return message

    async def _ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._identity()

    async def _list(self, args: dict[str, Any]) -> dict[str, Any]:
        domain = _text_arg(args, "domain")
        key = domain_key(domain) if domain else None
        deferred_only = bool(args.get("deferred_only", False))
        limit = args.get("limit", DEFAULT_LIST_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise AdminError("argument 'limit' must be a positive integer")
        messages = self.scheduler.messages
        held_off = self.scheduler.backoff_until
        found: list[dict[str, Any]] = []
        if key is None and not deferred_only:
            # A message leaves the scheduler when its last recipient is done: the total is known without
            # looking at every message, and a 1,000,000-message queue is listed as fast as a small one.
            for message in messages.values():
                if len(found) >= limit:
                    break
                if any(not r.state.done for r in message.recipients):
                    found.append(describe(message, held_off))
            return {"messages": found, "total": len(messages), "limit": limit}
        total = 0
        for message in messages.values():
            pending = [r for r in message.recipients if not r.state.done and (key is None or r.domain == key)]
            if not pending or (deferred_only and not any(waiting(r, held_off) for r in pending)):
                continue
            total += 1
            if len(found) < limit:
                found.append(describe(message, held_off))
        return {"messages": found, "total": total, "limit": limit}

    async def _show(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._message(args)
        headers = await self.io.read_headers(message.queue_id) or b""
        return {**describe(message, self.scheduler.backoff_until),
                "headers": headers.decode("utf-8", "replace"), "client": message.client}

    async def _change_one(self, args: dict[str, Any], decide: Callable[[Message], list[Change]]) -> tuple[str, int]:
        queue_id = self._message(args).queue_id
        applied = await self.ledger.apply([queue_id], decide, self.clock())
        if queue_id not in applied.found:  # gone while we waited for its lock (delivered, deleted)
            raise AdminError(f"unknown queue id {queue_id}", not_found=True)
        return queue_id, applied.count()

    async def _flush(self, args: dict[str, Any]) -> dict[str, Any]:
        domain = _text_arg(args, "domain")
        key = domain_key(domain) if domain else None
        if args.get("queue_id") is not None:
            queue_ids = [self._message(args).queue_id]
        else:
            queue_ids = [m.queue_id for m in self.scheduler.messages.values()
                         if any(r.state is State.DEFERRED for r in m.recipients)]

        def decide(message: Message) -> list[Change]:
            return [Change(copy_recipient(r, State.READY), frozenset({State.DEFERRED}), Event.FLUSHED)
                    for r in message.recipients if r.state is State.DEFERRED and (key is None or r.domain == key)]

        now = self.clock()
        chunks = [queue_ids[i:i + FLUSH_CHUNK] for i in range(0, len(queue_ids), FLUSH_CHUNK)]
        results = await asyncio.gather(*(self.ledger.apply(chunk, decide, now) for chunk in chunks),
                                       return_exceptions=True)
        self.scheduler.clear_backoff(key)
        self._wake()
        flushed = sum(r.count() for r in results if isinstance(r, Applied))
        log.info("flush%s: %d deferred recipients made ready by the queue administrator",
                 f" of {key}" if key else "", flushed)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {"flushed": flushed}

    async def _hold(self, args: dict[str, Any]) -> dict[str, Any]:
        def decide(message: Message) -> list[Change]:
            return [Change(copy_recipient(r, State.HELD), frozenset({State.READY, State.DEFERRED}), Event.HELD)
                    for r in message.recipients if r.state in (State.READY, State.DEFERRED)]

        queue_id, held = await self._change_one(args, decide)
        return {"queue_id": queue_id, "held": held}

    async def _release(self, args: dict[str, Any]) -> dict[str, Any]:
        def decide(message: Message) -> list[Change]:
            return [Change(copy_recipient(r, State.READY), frozenset({State.HELD}), Event.RELEASED)
                    for r in message.recipients if r.state is State.HELD]

        queue_id, released = await self._change_one(args, decide)
        return {"queue_id": queue_id, "released": released}

    def _drop_jobs(self, message: Message) -> None:
        """Forget the message's jobs in flight; the workers' late Results change nothing (but a delivery they
        report is logged: ledger.py)."""
        for job in [j for j in self.scheduler.jobs.values() if j.queue_id == message.queue_id]:
            self.scheduler.finish_job(job.job_id)
            self.ledger.job_dropped(job, message.arrival)

    async def _delete(self, args: dict[str, Any]) -> dict[str, Any]:
        def decide(message: Message) -> list[Change]:
            self._drop_jobs(message)
            return [Change(copy_recipient(r, State.FAILED, last=ADMIN_DELETE), PENDING, Event.DELETED)
                    for r in message.recipients if not r.state.done]

        queue_id, deleted = await self._change_one(args, decide)
        return {"queue_id": queue_id, "deleted": deleted}

    async def _bounce(self, args: dict[str, Any]) -> dict[str, Any]:
        def decide(message: Message) -> list[Change]:
            self._drop_jobs(message)
            return [Change(copy_recipient(r, State.FAILED, last=ADMIN_BOUNCE), PENDING, Event.BOUNCED,
                           bounce=True)
                    for r in message.recipients if not r.state.done]

        queue_id, bounced = await self._change_one(args, decide)
        return {"queue_id": queue_id, "bounced": bounced}

