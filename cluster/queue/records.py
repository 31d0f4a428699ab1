"""What a shard stores about a message and its recipients, and the states a recipient goes through.

A message is stored once with its body; each recipient has its own state:

    ready -> in_flight -> delivered | failed           (done: never looked at again)
                       -> deferred(next_attempt) -> ready
    any pending state <-> held                          (admin hold / release)

A message leaves the spool when every recipient is done. Queue ids are short, unique and sort by arrival time.
What last happened to a recipient is a typed `LastOutcome` (kind, reply code, enhanced status, text, remote
host), stored field by field and shown as it is: never a string that is parsed back.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
from dataclasses import dataclass, field

from cluster.bus.ring import domain_key
from cluster.bus.schemas import Outcome, OutcomeKind


class State(enum.StrEnum):
    READY = "ready"
    DEFERRED = "deferred"
    IN_FLIGHT = "in_flight"
    HELD = "held"
    DELIVERED = "delivered"
    FAILED = "failed"

    # The C hash of the string, consistent with the string equality a StrEnum has (Enum's own is computed in
    # Python): states are counter keys on every recipient change and at the load of a million messages.
    __hash__ = str.__hash__

    @property
    def done(self) -> bool:
        # A set of the two (hashed as strings), not `State.DELIVERED`: a member looked up on its class costs
        # ~0.35 us on Python 3.11, and this runs per recipient.
        return self in _DONE_STATES


PENDING_STATES = (State.READY, State.DEFERRED, State.IN_FLIGHT, State.HELD)
_DONE_STATES = frozenset({State.DELIVERED, State.FAILED})


@dataclass(frozen=True, init=False)
class LastOutcome:
    """What last happened to a recipient: the worker's typed outcome, the shard's expiry, or an admin action.

    code is 0 and enhanced "" when no SMTP reply was involved (an admin delete). One is made per recipient
    outcome, so the constructor fills the instance's dict at once (not five frozen `object.__setattr__` calls);
    fields, equality, hash and repr are the dataclass's."""

    kind: OutcomeKind
    code: int
    enhanced: str
    text: str
    remote: str = ""

    def __init__(self, kind: OutcomeKind, code: int, enhanced: str, text: str, remote: str = "") -> None:
        self.__dict__.update(kind=kind, code=code, enhanced=enhanced, text=text, remote=remote)

    @staticmethod
    def of(outcome: Outcome) -> LastOutcome:
        last = object.__new__(LastOutcome)
        last.__dict__.update(kind=outcome.kind, code=outcome.code, enhanced=outcome.enhanced, text=outcome.text,
                             remote=outcome.remote)
        return last

    @property
    def reply(self) -> str:
        """The reply as an SMTP server would say it ("550 5.1.1 no such user"), for people to read."""
        code, enhanced, text = self.code, self.enhanced, self.text
        if code and enhanced and text:
            return f"{code} {enhanced} {text}"
        return " ".join(str(part) for part in (code or "", enhanced, text) if part)

    def as_dict(self) -> dict[str, str | int]:
        return {"kind": self.kind.value, "code": self.code, "enhanced": self.enhanced, "text": self.text,
                "remote": self.remote}


@dataclass(slots=True)
class Recipient:
    index: int
    address: str
    state: State = State.READY
    attempts: int = 0
    next_attempt: float = 0.0
    last: LastOutcome | None = None
    domain: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.domain = recipient_domain(self.address)

    @property
    def remote(self) -> str:
        return self.last.remote if self.last is not None else ""

    def clone(self) -> Recipient:
        """A copy, field by field (slots: no __dict__), without computing the domain again (one per recipient
        outcome: the fields written out, not a loop of getattr/setattr; a test checks that none is left out)."""
        new = object.__new__(Recipient)
        new.index, new.address, new.state, new.attempts = self.index, self.address, self.state, self.attempts
        new.next_attempt, new.last, new.domain = self.next_attempt, self.last, self.domain
        return new


class Message:
    """A stored message as the shard keeps it in memory (its body stays in the spool).

    Memory matters here (a shard holds up to a million of these, ARCHITECTURE.md performance notes): slots,
    and `client` (the frontend's facts about the SMTP client, rarely read) kept as its compact JSON text,
    decoded on each read.
    """

    __slots__ = ("_client", "arrival", "forward_shard", "queue_id", "recipients", "sender", "size", "warned")

    def __init__(self, queue_id: str, sender: str, arrival: float, recipients: list[Recipient], size: int,
                 client: dict[str, str] | None = None, warned: bool = False, forward_shard: int = -1) -> None:
        self.queue_id = queue_id
        self.sender = sys.intern(sender)  # one string per sender, however many messages it sent
        self.arrival = arrival
        self.recipients = recipients
        self.size = size
        self._client = client_text(client or {})
        # Set once a "delayed" DSN was sent for this message (queue.delay_warning), so there is only one.
        self.warned = warned
        # -1: delivered from this shard; N >= 0: a bounce waiting to be injected into shard N (the outbox).
        self.forward_shard = forward_shard

    @classmethod
    def loaded(cls, queue_id: str, sender: str, arrival: float, recipients: list[Recipient], size: int,
               client_json: str, warned: bool, forward_shard: int) -> Message:
        """A message read back from the spool, its client facts still as the stored JSON text."""
        message = cls(queue_id, sender, arrival, recipients, size, None, warned, forward_shard)
        message._client = client_json
        return message

    @property
    def client(self) -> dict[str, str]:
        try:
            facts = json.loads(self._client)
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in facts.items()} if isinstance(facts, dict) else {}

    @client.setter
    def client(self, facts: dict[str, str]) -> None:
        self._client = client_text(facts)

    @property
    def pool(self) -> str:
        """The egress pool named in the client facts ("" = none): decoded only when the text names one."""
        return self.client.get("pool", "") if '"pool"' in self._client else ""

    @property
    def client_json(self) -> str:
        """The client facts as stored (compact JSON)."""
        return self._client

    @property
    def done(self) -> bool:
        return all(r.state.done for r in self.recipients)

    def _fields(self) -> tuple[object, ...]:
        return (self.queue_id, self.sender, self.arrival, self.recipients, self.size, self._client, self.warned,
                self.forward_shard)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return (f"Message(queue_id={self.queue_id!r}, sender={self.sender!r}, arrival={self.arrival!r}, "
                f"recipients={self.recipients!r}, size={self.size!r}, client={self._client}, "
                f"warned={self.warned!r}, forward_shard={self.forward_shard!r})")


def client_text(facts: dict[str, str]) -> str:
    """The compact JSON text of a message's client facts; identical texts share one string (interned).

    The facts of one client repeat from message to message: their text is remembered (CLIENT_TEXTS of them)."""
    if not facts:
        return "{}"
    if "trace_id" in facts:  # one per message (a frontend's submission): nothing to share, nothing to remember
        return _CLIENT_JSON.encode(facts)
    key = tuple(facts.items())
    text = _client_texts.get(key)
    if text is None:
        if len(_client_texts) >= CLIENT_TEXTS:
            _client_texts.clear()
        text = _client_texts[key] = sys.intern(_CLIENT_JSON.encode(facts))
    return text


CLIENT_TEXTS = 4096
_client_texts: dict[tuple[tuple[str, str], ...], str] = {}
# One encoder for every text (`json.dumps` with options builds a new one per call).
_CLIENT_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True, init=False)
class RecipientUpdate:
    """The durable part of one recipient's new state, written to the spool before memory trusts it (one per
    recipient outcome: the constructor fills the dict at once, as LastOutcome's does)."""

    queue_id: str
    index: int
    state: State
    attempts: int
    next_attempt: float
    last: LastOutcome | None

    def __init__(self, queue_id: str, index: int, state: State, attempts: int, next_attempt: float,
                 last: LastOutcome | None) -> None:
        self.__dict__.update(queue_id=queue_id, index=index, state=state, attempts=attempts,
                             next_attempt=next_attempt, last=last)

    @staticmethod
    def of(queue_id: str, recipient: Recipient) -> RecipientUpdate:
        update = object.__new__(RecipientUpdate)
        update.__dict__.update(queue_id=queue_id, index=recipient.index, state=recipient.state,
                               attempts=recipient.attempts, next_attempt=recipient.next_attempt, last=recipient.last)
        return update


RECIPIENT_SLOTS: tuple[str, ...] = Recipient.__slots__


def recipient_domain(address: str) -> str:
    """The queueing key of an address: its domain via `domain_key`; an address without one queues under "".

    Every recipient of a destination shares one (interned) domain string, and the IDNA work is done once per
    spelling of a domain, not once per recipient."""
    _, at, domain = address.rpartition("@")
    return _domain_key(domain) if at else ""


@functools.lru_cache(maxsize=1 << 16)
def _domain_key(domain: str) -> str:
    return sys.intern(domain_key(domain))


_BASE32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's alphabet: sorts like the numbers it encodes


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_BASE32[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class QueueIdFactory:
    """Queue ids: 10 base32 digits of milliseconds, 4 of a sequence number, 2 of the shard index (16 chars).

    Ids of one shard sort by creation time; the sequence starts at a random value per process so a restart
    within the same millisecond does not repeat an id, and it carries into the time part when it overflows.
    """

    def __init__(self, shard: int) -> None:
        self._shard = _base32(shard, 2)
        self._last = 0
        self._start = int.from_bytes(os.urandom(2), "big")

    def new(self, now: float) -> str:
        stamp = (int(now * 1000) << 20) | self._start
        stamp = max(stamp, self._last + 1)
        self._last = stamp
        # The 14 digits of time and sequence, two at a time (one id per stored message).
        pairs = _PAIRS
        return "".join([pairs[(stamp >> shift) & 1023] for shift in _PAIR_SHIFTS]) + self._shard


_PAIRS = [high + low for high in _BASE32 for low in _BASE32]  # index: the value of the two digits
_PAIR_SHIFTS = (60, 50, 40, 30, 20, 10, 0)
