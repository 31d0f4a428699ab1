"""Every message that crosses the cluster bus, in one place.

Transport: each shard binds one ZeroMQ ROUTER socket on its endpoint (`queue.shards[N]`). Frontends, workers
and the admin CLI connect DEALER sockets to it. Every ZeroMQ message is one frame: a msgpack map whose key "t"
names the message type. Unknown types and malformed maps are answered with `Error` (never a crash).

Compatibility (ARCHITECTURE.md, the bus): a field this release does not know, in a message or in a nested map
(an outcome, a transferred recipient), is ignored, so a later release may add an optional field (one with a
default) and still talk to this one during a rolling upgrade; a missing required field, or a known field of the
wrong type, is still refused. A new field that must not be ignored needs a new message type, which an older
release answers with Error.

Frontend -> shard (submission; ARCHITECTURE.md contract 1)
    Inject(req, sender, recipients, body, client)      one message, only this shard's recipients
    shard -> Stored(req, queue_id)                      after the spool transaction holding it is fsynced
    shard -> InjectRefused(req, code, enhanced, text)   e.g. 452 4.3.1 when the disk is full

Worker <-> shard (dispatch; credit-based flow control with heartbeats and leases; ARCHITECTURE.md contract 2)
    Heartbeat(worker, free, in_flight, seen, seen_epoch, incarnation, sent, finished)
                                         every `queue.heartbeat_interval`. Facts, not history: the shard
                                         rebuilds its view of the worker from each one.
                                         `free`: further jobs the worker takes from this shard; the shard sets
                                         the worker's credits to `free` minus the Delivers the worker cannot
                                         have counted yet, then spends one per Deliver and gets one back per
                                         Result until the next heartbeat.
                                         `in_flight`: jobs the worker holds and has not finished (renews their
                                         leases); `finished`: jobs whose Result it sent and keeps until the
                                         shard says to forget it (a Result can be lost in a network cut).
                                         `seen`: the highest Deliver.seq received from (or acked as sent by)
                                         the shard instance `seen_epoch` in the registration `incarnation`.
                                         A job with seq <= seen, or listed before, that is missing from both
                                         lists was lost and goes back to ready; a job sent after `seen` is never
                                         taken back by a heartbeat (it crossed the Deliver on the wire).
                                         `sent`: the worker's monotonic clock at sending (0 = unknown); the
                                         shard judges silence on when messages were sent, not when it read them.
    shard -> HeartbeatAck(shard, shard_epoch, incarnation, last_seq, revoked, resend, state)
                                         `shard_epoch` changes when the shard restarts. `incarnation` numbers
                                         the worker's registration (new each time the shard (re)registers it,
                                         e.g. after it was silent for `queue.worker_timeout`); Delivers
                                         numbering restarts at 1 in each. `last_seq`: every Deliver up to it
                                         was sent before this ack, so one not received by now was lost.
                                         `revoked`: listed jobs that are not the worker's (finished, or handed
                                         out again after it was silent): it must not start them and forgets
                                         their Results. `resend`: finished jobs whose Result never arrived.
    shard -> Deliver(job_id, queue_id, sender, recipients, domain, body, attempt, seq, epoch, incarnation,
                     pool, max_deliveries, source)
                                         seq numbers the Delivers sent to one (epoch, incarnation), from 1.
                                         `source`: the egress source (`[egress.sources]` name) the job leaves
                                         from, chosen by the shard that owns the destination from the message's
                                         pool (weighted, among the sources traffic shaping lets start now, so
                                         shaping limits hold per (source, destination)); the worker binds its
                                         address and says its EHLO name. "" = no source: the worker picks one
                                         from `pool` (a Deliver of a shard of the previous release), else the
                                         kernel's address. `pool`: the egress pool (`[egress.pools]`) the
                                         frontend chose for the message (Inject.client["pool"]); "" = no pool.
                                         `max_deliveries`: traffic shaping's max_deliveries_per_connection for
                                         the destination (0 = the worker's delivery.max_deliveries_per_connection).
    Result(job_id, worker, outcomes)     one Outcome per recipient of the job. A Result for a job the shard
                                         took back is reconciled: its outcomes stand for the recipients not
                                         handed out again; a delivery of one that was handed out again is a
                                         counted duplicate (mtacluster_queue_possible_duplicates_total).
    A worker silent for `queue.worker_timeout` is forgotten and its jobs go back to ready (counted as possible
    duplicates when handed out again). A worker whose shard has not acked for half of `queue.worker_timeout`
    starts no new job from it (fencing) until an ack says which of its jobs are still its own.

Shard -> shard (the outbox: forwarded DSNs and the queue of a draining shard; ARCHITECTURE.md contract 7)
    Transfer(req, queue_id, hops, sender, arrival, warned, client, recipients, body)
                                         one message (or one owner's part of it) with its state: arrival time,
                                         delay warning sent, client facts (trace id in the body's headers), and
                                         per recipient {address, state (ready, deferred or held), attempts,
                                         next_attempt, last (the typed last outcome map, or nil)}.
                                         `hops` counts the shards it has left; the receiver stores it under
                                         `queue_id` idempotently, keyed by (queue_id, hops): a resend of what
                                         it already has, or had and finished, is answered Stored again.
    shard -> Stored(req, queue_id)       after the transaction holding it is fsynced (the sender deletes its
                                         copy only then), or InjectRefused (e.g. 452 4.3.1 disk full).

Frontend -> shard (accounts; the shard owning the user name, or the client address, on the same ring:
cluster/bus/ring.py shard_for_key)
    Reserve(req, user, messages, recipients, max_messages, max_recipients, entry_id)
                                         a per-user daily limit (rolling 24 hours; 0 = no limit). With an
                                         empty entry_id it only asks whether that much more would fit (at MAIL
                                         and RCPT: nothing is recorded). With an entry_id it records the usage
                                         when it fits, committed in the spool (group commit) before the answer,
                                         and before the frontend injects the message it counts.
    shard -> Granted(req, entry_id, messages_used, recipients_used)      the usage after this one
    shard -> Refused(req, reason, messages_used, recipients_used)        reason "messages" or "recipients"
    Release(req, entry_id)               the message was not stored after all: the usage entry is removed
    shard -> Released(req, found)        (committed). Idempotent.
    AuthFailures(req, client_ip, failed, window, limit)
                                         failed AUTH from a client address: `failed` more of them now (0 to
                                         only ask); counted over `window` seconds, in memory (as Postfix's
                                         anvil: a shard restart forgets them)
    shard -> AuthStatus(req, failures, blocked_for)   blocked_for > 0: seconds until AUTH is allowed again

Admin (mtacluster queue ..., mtacluster shard ..., mtacluster user show)
    AdminRequest(req, op, args) -> AdminReply(req, ok, data, error)
    ping's data carries the shard's `state` (serving, draining, drained): frontends route around a shard
    that is not serving, and the HeartbeatAck's `state` tells workers the same.
    op "user_usage", args {"user": NAME} -> data {"messages": N, "recipients": N} in the current 24 hours

Any direction
    Error(text, req)                     the receiver could not understand or handle a frame; `req` names the
                                         request it answers (0 when the frame had no readable req).

Bodies are bytes (msgpack bin); text is str (msgpack str, UTF-8). Addresses are the SMTP path without angle
brackets; the null reverse-path is "".

Validation (`decode`): every field has its type checked, nested ones too (outcomes, in_flight, client); counts
are never negative; an Outcome's kind is one a worker may report (delivered, deferred, failed: `expired` is
decided by the shard) with a matching reply code; a Result from a worker of the previous release, whose
outcomes say `status` instead of `kind`, is read as the same thing. An Inject's
envelope is checked as strictly as the SMTP server checks MAIL FROM / RCPT TO (cluster/smtp/address.py, UTF-8
allowed as with SMTPUTF8): a sender the server would refuse, or a recipient without a domain, is a SchemaError,
so nothing the SMTP server would refuse can be stored through the bus. A SchemaError carries the frame's `req`
when it had a readable one, so the receiver can answer Error(text, req) and the sender stops waiting at once.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from cluster.smtp.address import (
    SmtpSyntaxError,
    is_plain_address,
    parse_forward_path,
    parse_reverse_path,
)


class SchemaError(ValueError):
    """A frame is not a valid bus message. `req`: the request id the frame carried, 0 if none was readable."""

    def __init__(self, text: str, req: int = 0) -> None:
        super().__init__(text)
        self.req = req


@dataclass(frozen=True)
class BusMessage:
    TYPE: ClassVar[str] = ""

    def encode(self) -> bytes:
        cls = type(self)
        body = self.__dict__.get("body")
        big = type(body) is bytes and len(body) >= BIG_BODY
        if cls not in _NESTED and not big:
            # Its fields are msgpack's own types (a str enum packs as its string): the dict of a frozen dataclass
            # is its fields in order, so the frame is the same as the field-by-field way below, made at once.
            try:
                fast: bytes = _PACKER.pack({**self.__dict__, "t": self.TYPE})
                return fast
            except TypeError:  # something msgpack cannot pack as it is (e.g. a nested message): the long way
                _PACKER.reset()
        payload = {name: _to_wire(getattr(self, name)) for name in _field_names(cls)}
        payload["t"] = self.TYPE
        if big:
            return _encode_with_big_body(payload, (payload.pop("body"),))
        packed: bytes = msgpack.packb(payload, use_bin_type=True)
        return packed


# One packer for the frames encoded at once (`msgpack.packb` makes a new one per call); with autoreset each
# `pack` returns the frame and starts empty again.
_PACKER = msgpack.Packer(use_bin_type=True, autoreset=True)
# A body of at least this many octets is not packed by msgpack but joined to the rest of the frame (below).
BIG_BODY = 64 * 1024
_BODY_KEY = msgpack.packb("body")


def _encode_with_big_body(payload: dict[str, Any], body: Sequence[bytes]) -> bytes:
    """The same msgpack map as `msgpack.packb` of `payload` (which has no "body") with a "body" entry last, the
    body given as parts (b"".join(body)), made with one copy of the body.

    msgpack.packb copies a 1 MiB body into its growing buffer, again as that buffer grows, and again into the
    bytes it returns, each time into fresh memory (about 0.5 ms per MiB in the shard, page faults included).
    Here the other entries are packed as a map of one entry less, whose header then counts the body too, and
    the body's parts follow them as one bin 32 in the one join. A receiver sees an ordinary map."""
    head = msgpack.packb(payload, use_bin_type=True)
    if head[0] >= 0x8F:  # not a fixmap of at most 14 entries: no message has that many fields
        payload["body"] = b"".join(body)
        packed: bytes = msgpack.packb(payload, use_bin_type=True)
        return packed
    size = sum(len(part) for part in body)
    return b"".join((bytes((head[0] + 1,)), memoryview(head)[1:], _BODY_KEY, b"\xc6", size.to_bytes(4, "big"),
                     *body))


def inject_frame(req: int, sender: str, recipients: list[str], body: Sequence[bytes],
                 client: dict[str, str]) -> bytes:
    """The frame of `Inject(req, sender, recipients, b"".join(body), client)`, octet for octet, with the body
    given as parts (a frontend's trace header fields, then the message): a big body is joined once, into the
    frame itself, instead of once into a body and again into the frame."""
    size = sum(len(part) for part in body)
    if size < BIG_BODY:
        return Inject(req=req, sender=sender, recipients=recipients, body=b"".join(body), client=client).encode()
    payload: dict[str, Any] = {"req": req, "sender": sender, "recipients": recipients, "client": client,
                               "t": Inject.TYPE}
    return _encode_with_big_body(payload, body)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: Any) -> tuple[str, ...]:
    """The dataclass fields of a message (or Outcome) class, looked up once per class (encode is per message)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


# Values msgpack takes as they are (exact types: an enum member, a str subclass, goes the long way).
_WIRE_AS_IS = frozenset({str, int, float, bool, bytes, dict, type(None)})


def _to_wire(value: Any) -> Any:
    if type(value) in _WIRE_AS_IS:
        return value
    if type(value) is Outcome:
        # Its dict is its fields (Outcome's docstring); msgpack packs the kind, a str enum, as its string value.
        return value.__dict__
    if isinstance(value, BusMessage | Outcome):
        return {name: _to_wire(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


@dataclass(frozen=True)
class Inject(BusMessage):
    TYPE: ClassVar[str] = "inject"
    req: int
    sender: str
    recipients: list[str]
    body: bytes
    # Free-form facts about the submission: client address, HELO name, protocol, frontend host, and "pool": the
    # egress pool the message leaves through (stored with the message, sent with each Deliver).
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
class Transfer(BusMessage):
    TYPE: ClassVar[str] = "transfer"
    req: int
    queue_id: str
    hops: int
    sender: str
    arrival: float
    warned: bool
    client: dict[str, str]
    recipients: list[dict[str, Any]]
    body: bytes


# What a transferred recipient may be in: in flight stays with the shard that dispatched it, done ones stay done.
TRANSFER_STATES = ("ready", "deferred", "held")


@dataclass(frozen=True)
class Heartbeat(BusMessage):
    TYPE: ClassVar[str] = "heartbeat"
    worker: str
    free: int
    in_flight: list[str]
    seen: int = 0
    seen_epoch: str = ""
    incarnation: int = 0
    sent: float = 0.0
    finished: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HeartbeatAck(BusMessage):
    TYPE: ClassVar[str] = "heartbeat_ack"
    shard: int
    shard_epoch: str
    incarnation: int = 0
    last_seq: int = 0
    revoked: list[str] = field(default_factory=list)
    resend: list[str] = field(default_factory=list)
    # The shard's drain state (serving, draining, drained); "" from a shard of the previous release.
    state: str = ""


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
    epoch: str = ""
    incarnation: int = 0
    # The egress pool the frontend chose for the message (Inject.client["pool"]); "" = no pool.
    pool: str = ""
    # Traffic shaping's max_deliveries_per_connection for the destination (0 = the worker's own setting).
    max_deliveries: int = 0
    # The egress source the shard chose from the pool ("" = none: the worker chooses from `pool`).
    source: str = ""


class OutcomeKind(enum.StrEnum):
    """What became of a recipient: the typed outcome that goes from worker to spool to DSN and CLI."""

    DELIVERED = "delivered"  # 2xx: done
    DEFERRED = "deferred"  # 4xx, network or DNS trouble: retry later
    FAILED = "failed"  # 5xx: bounce
    EXPIRED = "expired"  # deferred for longer than queue.max_lifetime: the shard gave up (4.4.7) and bounces

    @property
    def done(self) -> bool:
        return self is not OutcomeKind.DEFERRED


# What a worker may report; EXPIRED is the shard's own decision.
WORKER_KINDS = (OutcomeKind.DELIVERED, OutcomeKind.DEFERRED, OutcomeKind.FAILED)


@dataclass(frozen=True, init=False)
class Outcome:
    """What happened to one recipient of a job.

    kind: delivered (2xx), deferred (4xx, network or DNS trouble) or failed (5xx), never a string to parse.
    code/enhanced/text: the reply that decided it, kept apart; the remote server's own words when there was one.
    remote: the host that answered ("mx1.example.net[192.0.2.1]"), "local" for a Maildir, "" when none did;
    port: the TCP port it answered on (0 when none). connect_seconds: time to get a session (DNS, connect,
    greeting, EHLO, STARTTLS; 0 for a reused connection); transfer_seconds: time of the SMTP transaction.

    One is made per recipient (a Result of a 100-recipient message holds 100), so the constructor fills the
    instance's dict at once instead of the frozen dataclass's nine `object.__setattr__` calls; the fields, their
    order, equality, hash, repr and `dataclasses.replace` are the dataclass's. Its `__dict__` holds the fields
    and nothing else: it is what goes on the wire (`_to_wire`).
    """

    recipient: str
    kind: OutcomeKind
    code: int
    enhanced: str
    text: str
    remote: str = ""
    port: int = 0
    connect_seconds: float = 0.0
    transfer_seconds: float = 0.0

    def __init__(self, recipient: str, kind: OutcomeKind, code: int, enhanced: str, text: str, remote: str = "",
                 port: int = 0, connect_seconds: float = 0.0, transfer_seconds: float = 0.0) -> None:
        if kind.__class__ is not OutcomeKind and kind in OutcomeKind._value2member_map_:
            kind = OutcomeKind(kind)  # a plain string naming a kind
        self.__dict__.update(recipient=recipient, kind=kind, code=code, enhanced=enhanced, text=text, remote=remote,
                             port=port, connect_seconds=connect_seconds, transfer_seconds=transfer_seconds)


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
class Reserve(BusMessage):
    TYPE: ClassVar[str] = "reserve"
    req: int
    user: str
    messages: int
    recipients: int
    max_messages: int
    max_recipients: int
    entry_id: str = ""


@dataclass(frozen=True)
class Granted(BusMessage):
    TYPE: ClassVar[str] = "granted"
    req: int
    entry_id: str
    messages_used: int
    recipients_used: int


@dataclass(frozen=True)
class Refused(BusMessage):
    TYPE: ClassVar[str] = "refused"
    req: int
    reason: str
    messages_used: int
    recipients_used: int


@dataclass(frozen=True)
class Release(BusMessage):
    TYPE: ClassVar[str] = "release"
    req: int
    entry_id: str


@dataclass(frozen=True)
class Released(BusMessage):
    TYPE: ClassVar[str] = "released"
    req: int
    found: bool


@dataclass(frozen=True)
class AuthFailures(BusMessage):
    TYPE: ClassVar[str] = "auth_failures"
    req: int
    client_ip: str
    failed: int
    window: float
    limit: int


@dataclass(frozen=True)
class AuthStatus(BusMessage):
    TYPE: ClassVar[str] = "auth_status"
    req: int
    failures: int
    blocked_for: float


REFUSED_REASONS = ("messages", "recipients")


@dataclass(frozen=True)
class Error(BusMessage):
    """Answer to a frame the receiver could not understand."""

    TYPE: ClassVar[str] = "error"
    text: str
    req: int = 0


# Messages whose fields may hold other messages, Outcomes or values made for the wire (`_to_wire`): always encoded
# field by field.
_NESTED: frozenset[type[BusMessage]] = frozenset({Result, AdminRequest, AdminReply})


def result_frame(job_id: str, worker: str, outcomes: list[Outcome]) -> bytes:
    """The frame of `Result(job_id, worker, outcomes).encode()`, the same bytes, made without the message object
    and the general nested encoding (a worker sends one per job): each Outcome goes as its dict (its fields, in
    order; msgpack packs the kind, a str enum, as its string), through the shared packer."""
    if all(type(outcome) is Outcome for outcome in outcomes):
        try:
            frame: bytes = _PACKER.pack({"job_id": job_id, "worker": worker,
                                         "outcomes": [outcome.__dict__ for outcome in outcomes], "t": Result.TYPE})
            return frame
        except TypeError:  # a field msgpack cannot pack as it is: the long way, which says so
            _PACKER.reset()
    return Result(job_id=job_id, worker=worker, outcomes=outcomes).encode()

MESSAGE_TYPES: dict[str, type[BusMessage]] = {
    cls.TYPE: cls
    for cls in (Inject, Stored, InjectRefused, Transfer, Heartbeat, HeartbeatAck, Deliver, Result, AdminRequest,
                AdminReply, Reserve, Granted, Refused, Release, Released, AuthFailures, AuthStatus, Error)
}


def decode(frame: bytes | memoryview) -> BusMessage:
    """Decode one frame into its message dataclass; raise SchemaError for anything malformed."""
    try:
        payload = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise SchemaError(f"not msgpack: {exc}") from None
    if not isinstance(payload, dict):
        raise SchemaError("not a msgpack map")
    try:
        kind = payload.pop("t", None)
        # Only a str names a type: a list or map there cannot even be looked up (a TypeError, not a SchemaError).
        cls = MESSAGE_TYPES.get(kind) if type(kind) is str else None
        if cls is None:
            raise SchemaError("unknown or missing message type")
        if cls is Deliver:
            deliver = _plain_deliver(payload)
            if deliver is not None:
                return deliver
        return _checked_message(cls, payload)
    except SchemaError as exc:
        req = payload.get("req")
        if isinstance(req, int) and not isinstance(req, bool):
            exc.req = req
        raise


_FIELD_SETS: dict[type, frozenset[str]] = {}


def _checked_message(cls: type[BusMessage], payload: dict[str, Any]) -> BusMessage:
    """The message of class `cls` from its map (without "t"), every field checked; fields this release does
    not know are ignored (a later release's optional fields: ARCHITECTURE.md, the bus)."""
    known = _FIELD_SETS.get(cls)
    if known is None:
        known = _FIELD_SETS[cls] = frozenset(_field_names(cls))
    if not payload.keys() <= known:
        payload = {name: value for name, value in payload.items() if name in known}
    if cls is Result:
        payload["outcomes"] = _decode_outcomes(payload.get("outcomes", []))
    try:
        message = cls(**payload)
    except TypeError as exc:
        raise SchemaError(f"{cls.TYPE}: {exc}") from None
    _check_types(message)
    check = _CHECKS.get(cls)
    if check is not None:
        check(message)
    return message


_DELIVER_FIELDS = 13  # every field of Deliver


def _plain_deliver(payload: dict[str, Any]) -> Deliver | None:
    """The worker's everyday frame: a Deliver with every field, each of its exact type and the counts not
    negative, is made by filling its dict (no keyword call, no generic type table). Anything else (None) takes
    the general path, which says what is wrong."""
    if len(payload) != _DELIVER_FIELDS:
        return None
    get = payload.get
    recipients = get("recipients")
    attempt, seq, incarnation = get("attempt"), get("seq"), get("incarnation")
    if not (type(recipients) is list and type(attempt) is int and type(seq) is int and type(incarnation) is int
            and attempt >= 0 and seq >= 0 and incarnation >= 0 and type(get("body")) is bytes
            and type(get("max_deliveries")) is int and all(type(r) is str for r in recipients)
            and all(type(get(name)) is str for name in ("job_id", "queue_id", "sender", "domain", "epoch", "pool",
                                                         "source"))):
        return None
    deliver: Deliver = object.__new__(Deliver)
    deliver.__dict__.update(payload)
    return deliver


def _decode_outcomes(raw: Any) -> list[Outcome]:
    if not isinstance(raw, list):
        raise SchemaError("result.outcomes: expected a list")
    outcomes = []
    for item in raw:
        outcome = _well_formed_outcome(item)
        outcomes.append(outcome if outcome is not None else _checked_outcome(item))
    return outcomes


def _checked_outcome(item: Any) -> Outcome:
    """The Outcome of one outcome map, every field checked (fields this release does not know are ignored);
    SchemaError naming what is wrong."""
    if not isinstance(item, dict):
        raise SchemaError("result.outcomes: expected a list of maps")
    if "status" in item and "kind" not in item:  # a worker of the previous release
        item = dict(item)
        item["kind"] = item.pop("status")
    if not item.keys() <= _OUTCOME_FIELDS:
        item = {name: value for name, value in item.items() if name in _OUTCOME_FIELDS}
    kind = item.get("kind")
    if kind not in WORKER_KINDS:
        raise SchemaError(f"result.outcomes.kind: {kind!r} is not one of {[str(k) for k in WORKER_KINDS]}")
    try:
        outcome = Outcome(**item)
    except TypeError as exc:
        raise SchemaError(f"result: bad outcome: {exc}") from None
    _check_types(outcome, "result.outcomes")
    if not 100 <= outcome.code <= 599 or kind_of_code(outcome.code) is not outcome.kind:
        raise SchemaError(f"result.outcomes.code: {outcome.code} does not fit kind {str(outcome.kind)!r}")
    return outcome


def kind_of_code(code: int) -> OutcomeKind:
    """The only kind a reply code allows: 2xx delivered, 5xx failed, anything else deferred (a worker defers
    an odd 1xx/3xx where a final reply belongs: cluster/delivery/deliver.py:outcome_from_reply)."""
    return _KIND_OF_CLASS.get(code // 100, OutcomeKind.DEFERRED)


_KIND_OF_CLASS = {2: OutcomeKind.DELIVERED, 5: OutcomeKind.FAILED}
_DEFERRED = OutcomeKind.DEFERRED  # a module constant: an enum member looked up on its class is slow on 3.11
_WORKER_KIND_NAMED = {kind.value: kind for kind in WORKER_KINDS}
_OUTCOME_NAMES = tuple(f.name for f in dataclasses.fields(Outcome))
_OUTCOME_FIELDS = frozenset(_OUTCOME_NAMES)
_OUTCOME_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Outcome) if f.default is not dataclasses.MISSING}
_NUMBER_TYPES = (int, float)


def _well_formed_outcome(item: Any) -> Outcome | None:
    """The Outcome of an outcome map that passes every check of `_decode_outcomes` with exact types (what a
    worker sends), built without a call per field; None for anything else, which the checked way then decodes or
    refuses with the reason. A Result carries one per recipient, 100 for a 100-recipient message."""
    if type(item) is not dict:
        return None
    if len(item) == len(_OUTCOME_FIELDS) and item.keys() == _OUTCOME_FIELDS:
        values = item  # every field, as a worker of this release sends them: the decoded map itself is used
    else:
        values = {**_OUTCOME_DEFAULTS, **item}
        if not values.keys() >= _OUTCOME_FIELDS:  # a field missing, or "status" (a previous release)
            return None
        # Only the fields (a later release's are ignored: ARCHITECTURE.md, the bus), in the dataclass's order.
        values = {name: values[name] for name in _OUTCOME_NAMES}
    kind, code, port = values["kind"], values["code"], values["port"]
    connect, transfer = values["connect_seconds"], values["transfer_seconds"]
    if (type(kind) is not str or type(code) is not int or not 100 <= code <= 599
            or _WORKER_KIND_NAMED.get(kind) is not _KIND_OF_CLASS.get(code // 100, _DEFERRED)
            or type(values["recipient"]) is not str or type(values["enhanced"]) is not str
            or type(values["text"]) is not str or type(values["remote"]) is not str
            or type(port) is not int or port < 0 or type(connect) not in _NUMBER_TYPES or connect < 0
            or type(transfer) not in _NUMBER_TYPES or transfer < 0):
        return None
    values["kind"] = _WORKER_KIND_NAMED[kind]
    outcome = object.__new__(Outcome)
    outcome.__dict__.update(values)
    return outcome

_EXPECTED: dict[str, type | tuple[type, ...]] = {
    "req": int, "sender": str, "recipients": list, "body": bytes, "client": dict, "queue_id": str,
    "code": int, "enhanced": str, "text": str, "worker": str, "free": int, "in_flight": list,
    "shard": int, "shard_epoch": str, "incarnation": int, "last_seq": int, "sent": (int, float), "epoch": str,
    "finished": list, "revoked": list, "resend": list, "pool": str, "max_deliveries": int, "source": str,
    "seen": int, "seen_epoch": str, "seq": int, "job_id": str, "domain": str, "attempt": int, "outcomes": list,
    "op": str, "args": dict, "ok": bool, "error": str, "recipient": str, "kind": str, "remote": str,
    "port": int, "connect_seconds": (int, float), "transfer_seconds": (int, float),
    "hops": int, "arrival": (int, float), "warned": bool, "state": str,
    "user": str, "messages": int, "max_messages": int, "max_recipients": int, "entry_id": str,
    "messages_used": int, "recipients_used": int, "reason": str, "found": bool, "client_ip": str, "failed": int,
    "window": (int, float), "limit": int, "failures": int, "blocked_for": (int, float),
}

# Number fields that count or measure something, so can never be negative.
_COUNTS = frozenset({"req", "free", "seen", "seq", "attempt", "shard", "port", "connect_seconds",
                     "transfer_seconds", "incarnation", "last_seq", "hops", "arrival", "messages", "max_messages",
                     "max_recipients", "messages_used", "recipients_used", "failed", "limit", "failures"})


_TypeTable = tuple[tuple[str, type | tuple[type, ...] | None, bool], ...]
_TYPE_TABLES: dict[type, _TypeTable] = {}


def _type_table(cls: type) -> _TypeTable:
    """(field, expected type, is a count) for each field of a message class, built once per class."""
    table = _TYPE_TABLES.get(cls)
    if table is None:
        # Reserve counts recipients (an int); everywhere else "recipients" is a list of addresses.
        table = _TYPE_TABLES[cls] = tuple(
            (name, int if issubclass(cls, Reserve) and name == "recipients" else _EXPECTED.get(name), name in _COUNTS)
            for name in _field_names(cls))
    return table


def _check_types(message: BusMessage | Outcome, where: str = "") -> None:
    for name, expected, count in _type_table(type(message)):
        value = getattr(message, name)
        if expected is not None and (not isinstance(value, expected) or (isinstance(value, bool) and expected is int)):
            where = where or getattr(message, "TYPE", "")
            raise SchemaError(f"{where}.{name}: expected {_type_name(expected)}, got {type(value).__name__}")
        if count and value < 0:
            raise SchemaError(f"{where or getattr(message, 'TYPE', '')}.{name}: must not be negative")


def _type_name(expected: type | tuple[type, ...]) -> str:
    return expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)


def _strings(where: str, values: list[Any]) -> None:
    if not all(isinstance(v, str) for v in values):
        raise SchemaError(f"{where}: expected a list of strings")


def sender_problem(sender: str) -> str | None:
    """Why `sender` (a reverse-path without brackets, "" for null) is not one the SMTP server accepts; or None."""
    if not sender or is_plain_address(sender):
        return None
    try:
        parse_reverse_path(f"<{sender}>", smtputf8=True)
    except SmtpSyntaxError as exc:
        return f"invalid sender {sender!r}: {exc.reply.text}"
    return None


def recipient_problem(recipient: str) -> str | None:
    """Why `recipient` (a forward-path without brackets) is not one the SMTP server accepts; or None.

    Unlike RCPT TO, a bare <Postmaster> is refused: the SMTP server has already given it this host's domain."""
    if is_plain_address(recipient):
        return None
    try:
        address = parse_forward_path(f"<{recipient}>", smtputf8=True)
    except SmtpSyntaxError as exc:
        return f"invalid recipient {recipient!r}: {exc.reply.text}"
    if not address.domain:
        return f"invalid recipient {recipient!r}: no domain"
    return None


def _check_inject(message: BusMessage) -> None:
    assert isinstance(message, Inject)
    _strings("inject.recipients", message.recipients)
    problem = sender_problem(message.sender)
    if problem is None:
        problem = next(filter(None, map(recipient_problem, message.recipients)), None)
    if problem is not None:
        raise SchemaError(f"inject: {problem}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in message.client.items()):
        raise SchemaError("inject.client: expected a map of strings to strings")


def _check_transfer(message: BusMessage) -> None:
    assert isinstance(message, Transfer)
    if not message.queue_id:
        raise SchemaError("transfer.queue_id: must not be empty")
    if not message.recipients:
        raise SchemaError("transfer.recipients: must not be empty")
    problem = sender_problem(message.sender)
    for item in message.recipients:
        if not isinstance(item, dict):
            raise SchemaError("transfer.recipients: expected a list of maps")
        address, state = item.get("address"), item.get("state")
        if not isinstance(address, str) or state not in TRANSFER_STATES:
            raise SchemaError(f"transfer.recipients: need an address and a state in {list(TRANSFER_STATES)}")
        attempts, next_attempt, last = item.get("attempts", 0), item.get("next_attempt", 0.0), item.get("last")
        if (not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0
                or not isinstance(next_attempt, int | float) or isinstance(next_attempt, bool)):
            raise SchemaError("transfer.recipients: attempts and next_attempt must be non-negative numbers")
        if last is not None and not (isinstance(last, dict) and last.get("kind") in OutcomeKind._value2member_map_
                                     and isinstance(last.get("code", 0), int)
                                     and all(isinstance(last.get(k, ""), str) for k in ("enhanced", "text",
                                                                                         "remote"))):
            raise SchemaError("transfer.recipients.last: expected nil or a typed outcome map")
        problem = problem or recipient_problem(address)
    if problem is not None:
        raise SchemaError(f"transfer: {problem}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in message.client.items()):
        raise SchemaError("transfer.client: expected a map of strings to strings")


def _check_deliver(message: BusMessage) -> None:
    # Addresses are not re-checked here: a Deliver carries what a shard stored, and a worker answers a bad one
    # with a permanent failure (it must answer, or the job would come back forever).
    assert isinstance(message, Deliver)
    _strings("deliver.recipients", message.recipients)


def _check_heartbeat(message: BusMessage) -> None:
    assert isinstance(message, Heartbeat)
    _strings("heartbeat.in_flight", message.in_flight)
    _strings("heartbeat.finished", message.finished)


def _check_ack(message: BusMessage) -> None:
    assert isinstance(message, HeartbeatAck)
    _strings("heartbeat_ack.revoked", message.revoked)
    _strings("heartbeat_ack.resend", message.resend)


def _check_admin_request(message: BusMessage) -> None:
    assert isinstance(message, AdminRequest)
    if not message.op:
        raise SchemaError("admin.op: must not be empty")


def _check_refused(message: BusMessage) -> None:
    assert isinstance(message, InjectRefused)
    if not 400 <= message.code <= 599:
        raise SchemaError(f"inject_refused.code: {message.code} is not a 4xx or 5xx reply code")


def _check_reserve(message: BusMessage) -> None:
    assert isinstance(message, Reserve)
    if message.recipients < 0:
        raise SchemaError("reserve.recipients: must not be negative")


def _check_accounts_times(message: BusMessage) -> None:
    assert isinstance(message, AuthFailures | AuthStatus)
    seconds = message.window if isinstance(message, AuthFailures) else message.blocked_for
    if seconds < 0:
        raise SchemaError(f"{message.TYPE}: a duration must not be negative")


_CHECKS: dict[type[BusMessage], Callable[[BusMessage], None]] = {
    Inject: _check_inject, Transfer: _check_transfer, Deliver: _check_deliver, Heartbeat: _check_heartbeat,
    HeartbeatAck: _check_ack,
    AdminRequest: _check_admin_request, InjectRefused: _check_refused, Reserve: _check_reserve,
    AuthFailures: _check_accounts_times, AuthStatus: _check_accounts_times,
}
