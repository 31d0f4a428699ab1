"""Every message that crosses the cluster bus, in one place.

Transport: each shard binds one ZeroMQ ROUTER socket on its endpoint (`queue.shards[N]`). Frontends, workers
and the admin CLI connect DEALER sockets to it. Every ZeroMQ message is one frame: a msgpack map whose key "t"
names the message type. Unknown types and malformed maps are answered with `Error` (never a crash).

Frontend -> shard (submission; DESIGN.md contract 1)
    Inject(req, sender, recipients, body, client)      one message, only this shard's recipients
    shard -> Stored(req, queue_id)                      after the spool transaction holding it is fsynced
    shard -> InjectRefused(req, code, enhanced, text)   e.g. 452 4.3.1 when the disk is full

Worker <-> shard (dispatch; credit-based flow control with heartbeats and leases)
    Heartbeat(worker, free, in_flight, seen, seen_epoch)
                                         every `queue.heartbeat_interval`. `free` is the number of further
                                         jobs the worker takes from this shard. A shard that does not know
                                         the worker (first contact, or the shard restarted) sets the worker's
                                         credits to `free`; afterwards credits go down by one per Deliver and
                                         up by one per Result. `in_flight` lists the job ids the worker holds;
                                         it renews their leases. `seen` is the highest Deliver.seq the worker
                                         has received from the shard instance `seen_epoch`: a job the shard
                                         sent with seq <= seen that is missing from `in_flight` was lost and
                                         goes back to ready. Jobs sent after `seen` are never taken back by a
                                         heartbeat (it crossed the Deliver on the wire): no double delivery.
    shard -> Deliver(job_id, queue_id, sender, recipients, domain, body, attempt, seq)
                                         seq numbers the Delivers sent to one worker, from 1, per shard epoch.
    Result(job_id, outcomes)             one Outcome per recipient of the job; returns one credit.
    shard -> HeartbeatAck(shard_epoch)   lets the worker notice that the shard restarted.
    A worker silent for `queue.worker_timeout` is forgotten and all its jobs go back to ready.

Admin (mtacluster queue ...)
    AdminRequest(req, op, args) -> AdminReply(req, ok, data, error)

Bodies are bytes (msgpack bin); text is str (msgpack str, UTF-8). Addresses are the SMTP path without angle
brackets; the null reverse-path is "".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack


class SchemaError(ValueError):
    """A frame is not a valid bus message."""


@dataclass(frozen=True)
class BusMessage:
    TYPE: ClassVar[str] = ""

    def encode(self) -> bytes:
        payload = {f.name: _to_wire(getattr(self, f.name)) for f in dataclasses.fields(self)}
        payload["t"] = self.TYPE
        packed: bytes = msgpack.packb(payload, use_bin_type=True)
        return packed


def _to_wire(value: Any) -> Any:
    if isinstance(value, BusMessage | Outcome):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    return value


@dataclass(frozen=True)
class Inject(BusMessage):
    TYPE: ClassVar[str] = "inject"
    req: int
    sender: str
    recipients: list[str]
    body: bytes
    # Free-form facts about the submission: client address, HELO name, protocol, frontend host.
    client: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stored(BusMessage):
    TYPE: ClassVar[str] = "stored"
    req: int
    queue_id: str


@dataclass(frozen=True)
class InjectRefused(BusMessage):
    TYPE: ClassVar[str] = "inject_refused"
    req: int
    code: int
    enhanced: str
    text: str


@dataclass(frozen=True)
class Heartbeat(BusMessage):
    TYPE: ClassVar[str] = "heartbeat"
    worker: str
    free: int
    in_flight: list[str]
    seen: int = 0
    seen_epoch: str = ""


@dataclass(frozen=True)
class HeartbeatAck(BusMessage):
    TYPE: ClassVar[str] = "heartbeat_ack"
    shard: int
    shard_epoch: str


@dataclass(frozen=True)
class Deliver(BusMessage):
    TYPE: ClassVar[str] = "deliver"
    job_id: str
    queue_id: str
    sender: str
    recipients: list[str]
    domain: str
    body: bytes
    attempt: int
    seq: int = 0


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient of a job.

    status: "delivered" (2xx), "deferred" (4xx, network or DNS trouble: retry later) or "failed" (5xx: bounce).
    code/enhanced/text: the reply that decided it; the remote server's own words when there was one.
    remote: the host that answered ("mx1.example.net[192.0.2.1]"), "" when none did.
    """

    recipient: str
    status: str
    code: int
    enhanced: str
    text: str
    remote: str = ""


OUTCOME_STATUSES = ("delivered", "deferred", "failed")


@dataclass(frozen=True)
class Result(BusMessage):
    TYPE: ClassVar[str] = "result"
    job_id: str
    worker: str
    outcomes: list[Outcome]


@dataclass(frozen=True)
class AdminRequest(BusMessage):
    TYPE: ClassVar[str] = "admin"
    req: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdminReply(BusMessage):
    TYPE: ClassVar[str] = "admin_reply"
    req: int
    ok: bool
    data: Any = None
    error: str = ""


@dataclass(frozen=True)
class Error(BusMessage):
    """Answer to a frame the receiver could not understand."""

    TYPE: ClassVar[str] = "error"
    text: str


MESSAGE_TYPES: dict[str, type[BusMessage]] = {
    cls.TYPE: cls
    for cls in (Inject, Stored, InjectRefused, Heartbeat, HeartbeatAck, Deliver, Result, AdminRequest,
                AdminReply, Error)
}


def decode(frame: bytes) -> BusMessage:
    """Decode one frame into its message dataclass; raise SchemaError for anything malformed."""
    try:
        payload = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise SchemaError(f"not msgpack: {exc}") from None
    if not isinstance(payload, dict):
        raise SchemaError("not a msgpack map")
    cls = MESSAGE_TYPES.get(payload.pop("t", None))
    if cls is None:
        raise SchemaError("unknown or missing message type")
    names = {f.name for f in dataclasses.fields(cls)}
    if not set(payload) <= names:
        raise SchemaError(f"{cls.TYPE}: unknown fields {sorted(set(payload) - names)}")
    if cls is Result:
        try:
            payload["outcomes"] = [Outcome(**o) for o in payload.get("outcomes", [])]
        except TypeError as exc:
            raise SchemaError(f"result: bad outcome: {exc}") from None
    try:
        message = cls(**payload)
    except TypeError as exc:
        raise SchemaError(f"{cls.TYPE}: {exc}") from None
    _check_types(message)
    return message


_EXPECTED: dict[str, type | tuple[type, ...]] = {
    "req": int, "sender": str, "recipients": list, "body": bytes, "client": dict, "queue_id": str,
    "code": int, "enhanced": str, "text": str, "worker": str, "free": int, "in_flight": list,
    "shard": int, "shard_epoch": str,
    "seen": int, "seen_epoch": str, "seq": int, "job_id": str, "domain": str, "attempt": int, "outcomes": list,
    "op": str, "args": dict, "ok": bool, "error": str,
}


def _check_types(message: BusMessage) -> None:
    for f in dataclasses.fields(message):
        expected = _EXPECTED.get(f.name)
        value = getattr(message, f.name)
        if expected is not None and (not isinstance(value, expected) or (isinstance(value, bool) and expected is int)):
            raise SchemaError(f"{message.TYPE}.{f.name}: expected {expected}, got {type(value).__name__}")
    if isinstance(message, Inject | Deliver) and not all(isinstance(r, str) for r in message.recipients):
        raise SchemaError(f"{message.TYPE}.recipients: expected a list of strings")
