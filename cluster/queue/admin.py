"""Admin operations of a shard, answered over AdminRequest(op, args) -> AdminReply(ok, data, error).

    ping    {}                                                 -> {"shard", "epoch", "ready"}  (frontend readiness)
    list    {domain?: str, deferred_only?: bool, limit?: int}  -> [message, ...]
    show    {queue_id}                                         -> message + {"headers": str}
    flush   {domain?: str, queue_id?: str}                     -> {"flushed": n}   deferred -> ready now
    hold    {queue_id}                                         -> {"queue_id", "held": n}
    release {queue_id}                                         -> {"queue_id", "released": n}
    delete  {queue_id}                                         -> {"queue_id", "deleted": n}  no DSN
    bounce  {queue_id}                                         -> {"queue_id", "bounced": n}  5.0.0 + DSN
where message = {"queue_id", "sender", "arrival", "size", "recipients": [{"address", "state", "attempts",
"next_attempt", "last_reply", "remote"}]}. Every change is written to the spool before it is answered.
Errors (unknown op, unknown queue id, bad argument) raise KeyError/ValueError; the shard turns them into
AdminReply(ok=False, error=text), e.g. "unknown queue id 01ABC".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cluster.bus.ring import domain_key
from cluster.queue.records import Message, Recipient, State

if TYPE_CHECKING:
    from cluster.queue.shard import Shard

DEFAULT_LIST_LIMIT = 10_000
ADMIN_BOUNCE_REPLY = "550 5.0.0 Message deleted and returned by the queue administrator"


def describe(message: Message) -> dict[str, Any]:
    return {
        "queue_id": message.queue_id, "sender": message.sender, "arrival": message.arrival, "size": message.size,
        "recipients": [{"address": r.address, "state": r.state.value, "attempts": r.attempts,
                        "next_attempt": r.next_attempt, "last_reply": r.last_reply, "remote": r.remote}
                       for r in message.recipients],
    }


def _copy(recipient: Recipient, state: State, last_reply: str | None = None) -> Recipient:
    return Recipient(recipient.index, recipient.address, state, recipient.attempts, 0.0,
                     recipient.last_reply if last_reply is None else last_reply, recipient.remote)


def _text_arg(args: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = args.get(name)
    if value is None:
        if required:
            raise ValueError(f"missing argument {name!r}")
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"argument {name!r} must be a non-empty string")
    return value


class AdminOps:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": self._ping, "list": self._list, "show": self._show, "flush": self._flush, "hold": self._hold,
            "release": self._release, "delete": self._delete, "bounce": self._bounce,
        }
        handler = handlers.get(op)
        if handler is None:
            raise ValueError(f"unknown admin operation {op!r} (known: {', '.join(handlers)})")
        return await handler(args)

    def _message(self, args: dict[str, Any]) -> Message:
        queue_id = _text_arg(args, "queue_id", required=True)
        assert queue_id is not None
        message = self.shard.scheduler.messages.get(queue_id)
        if message is None:
            raise KeyError(f"unknown queue id {queue_id}")
        return message

    async def _ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"shard": self.shard.index, "epoch": self.shard.epoch, "ready": self.shard.is_ready()}

    async def _list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        domain = _text_arg(args, "domain")
        key = domain_key(domain) if domain else None
        deferred_only = bool(args.get("deferred_only", False))
        limit = args.get("limit", DEFAULT_LIST_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError("argument 'limit' must be a positive integer")
        found: list[dict[str, Any]] = []
        for message in self.shard.scheduler.messages.values():
            pending = [r for r in message.recipients if not r.state.done and (key is None or r.domain == key)]
            if not pending or (deferred_only and not any(r.state is State.DEFERRED for r in pending)):
                continue
            found.append(describe(message))
            if len(found) >= limit:
                break
        return found

    async def _show(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._message(args)
        headers = await self.shard.read_headers(message.queue_id) or b""
        return {**describe(message), "headers": headers.decode("utf-8", "replace"), "client": message.client}

    async def _change(self, message: Message, select: Callable[[Recipient], bool], state: State) -> int:
        changes = [(r, _copy(r, state)) for r in message.recipients if select(r)]
        if changes:
            await self.shard.apply_changes(message, changes, self.shard.clock(), bounce=False)
        return len(changes)

    async def _flush(self, args: dict[str, Any]) -> dict[str, Any]:
        domain = _text_arg(args, "domain")
        key = domain_key(domain) if domain else None
        if args.get("queue_id") is not None:
            messages = [self._message(args)]
        else:
            messages = list(self.shard.scheduler.messages.values())
        flushed = 0
        for message in messages:
            flushed += await self._change(
                message, lambda r: r.state is State.DEFERRED and (key is None or r.domain == key), State.READY)
        backoff = self.shard.scheduler.backoff_until
        for name in [d for d in backoff if key is None or d == key]:
            del backoff[name]
        self.shard.wake_dispatcher()
        return {"flushed": flushed}

    async def _hold(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._message(args)
        held = await self._change(message, lambda r: r.state in (State.READY, State.DEFERRED), State.HELD)
        return {"queue_id": message.queue_id, "held": held}

    async def _release(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._message(args)
        released = await self._change(message, lambda r: r.state is State.HELD, State.READY)
        return {"queue_id": message.queue_id, "released": released}

    def _drop_jobs(self, message: Message) -> None:
        """Forget the message's jobs in flight; the workers' late Results are then ignored."""
        for job in [j for j in self.shard.scheduler.jobs.values() if j.queue_id == message.queue_id]:
            self.shard.scheduler.finish_job(job.job_id)

    async def _delete(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._message(args)
        self._drop_jobs(message)
        pending = [r for r in message.recipients if not r.state.done]
        changes = [(r, _copy(r, State.FAILED, "deleted by the queue administrator")) for r in pending]
        await self.shard.apply_changes(message, changes, self.shard.clock(), completed_as="deleted", bounce=False)
        return {"queue_id": message.queue_id, "deleted": len(pending)}

    async def _bounce(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._message(args)
        self._drop_jobs(message)
        pending = [r for r in message.recipients if not r.state.done]
        changes = [(r, _copy(r, State.FAILED, ADMIN_BOUNCE_REPLY)) for r in pending]
        await self.shard.apply_changes(message, changes, self.shard.clock(), completed_as="failed", status="5.0.0")
        return {"queue_id": message.queue_id, "bounced": len(pending)}
