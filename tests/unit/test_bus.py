"""Bus schemas round-trip and refuse malformed frames; the shard ring is stable and balanced."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from typing import cast

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.bus import schemas
from cluster.bus.ring import domain_key, shard_for_address, shard_for_domain
from cluster.bus.schemas import (
    BIG_BODY,
    AdminReply,
    AdminRequest,
    AuthStatus,
    BusMessage,
    Deliver,
    Error,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Inject,
    InjectRefused,
    Outcome,
    OutcomeKind,
    Result,
    SchemaError,
    Stored,
    Transfer,
    decode,
    is_plain_address,
    recipient_problem,
)
from cluster.queue.transfer import message_of
from cluster.smtp import replies
from cluster.smtp.address import _parse_path as full_parse
from cluster.smtp.address import parse_forward_path, parse_reverse_path


@pytest.mark.parametrize("message", [
    Inject(req=7, sender="a@b.test", recipients=["c@d.test"], body=b"\x00\xffbody", client={"ip": "127.0.0.1"}),
    Stored(req=7, queue_id="Q1"),
    Heartbeat(worker="w1", free=10, in_flight=["j1", "j2"]),
    Deliver(job_id="j", queue_id="q", sender="", recipients=["x@y.test"], domain="y.test", body=b"b", attempt=2),
    Result(job_id="j", worker="w", outcomes=[Outcome("x@y.test", "deferred", 451, "4.4.1", "busy", "mx[1.2.3.4]")]),
    AdminRequest(req=1, op="list", args={"domain": "y.test"}),
])
def test_round_trip(message: object) -> None:
    assert decode(message.encode()) == message  # type: ignore[attr-defined]


BIG = bytes(range(256)) * (BIG_BODY // 256) + b"tail"


@pytest.mark.parametrize("message", [
    Inject(req=7, sender="a@b.test", recipients=["c@d.test"], body=BIG, client={"ip": "127.0.0.1", "pool": "p"}),
    Deliver(job_id="j", queue_id="q", sender="", recipients=["x@y.test"], domain="y.test", body=BIG, attempt=2,
            seq=9, epoch="e", incarnation=3, pool="p", max_deliveries=5, source="s"),
    Transfer(req=3, queue_id="Q1", hops=1, sender="a@b.test", arrival=1.5, warned=False, client={},
             recipients=[{"address": "x@y.test", "state": "ready", "attempts": 0, "next_attempt": 0.0,
                          "last": None}], body=BIG),
])
def test_a_big_body_is_joined_to_the_frame_as_msgpack_would_pack_it(message: Inject | Deliver | Transfer) -> None:
    frame = message.encode()
    payload = {name: getattr(message, name) for name in (f.name for f in dataclasses.fields(message))}
    payload["t"] = message.TYPE
    assert msgpack.unpackb(frame) == msgpack.unpackb(msgpack.packb(payload, use_bin_type=True))  # any reader's view
    assert frame.endswith(b"\xa4body\xc6" + len(BIG).to_bytes(4, "big") + BIG)  # joined, not packed
    assert decode(frame) == message


@pytest.mark.parametrize("parts", [
    (b"Received: x\r\n", BIG),  # a frontend's header fields, then a big message: joined into the frame
    (b"", BIG), (BIG,),
    (b"Received: x\r\n", b"small body\r\n"),  # under BIG_BODY: the ordinary encode
    (b"X" * (BIG_BODY - 10), b"Y" * 10),  # exactly BIG_BODY octets in all
])
def test_an_inject_frame_from_body_parts_is_the_frame_of_the_joined_body(parts: tuple[bytes, ...]) -> None:
    client = {"ip": "127.0.0.1", "trace_id": "t"}
    frame = schemas.inject_frame(5, "a@b.test", ["c@d.test"], parts, client)
    message = Inject(req=5, sender="a@b.test", recipients=["c@d.test"], body=b"".join(parts), client=client)
    assert frame == message.encode()
    assert decode(frame) == message


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"t": "nope"}), msgpack.packb({"req": 1}),
    msgpack.packb({"t": "stored", "req": 1}),
    msgpack.packb({"t": "stored", "req": "1", "queue_id": "q"}),
    msgpack.packb({"t": "stored", "req": 1, "extra": 1}),  # an unknown field does not stand for a missing one
    msgpack.packb({"t": "inject", "req": 1, "sender": "", "recipients": [1], "body": b"", "client": {}}),
    msgpack.packb({"t": "result", "job_id": "j", "worker": "w", "outcomes": [{"bad": 1}]}),
    # A type that cannot be a dict key: a TypeError here would end the shard's (or a link's) receive loop.
    msgpack.packb({"t": [1], "req": 3}),
    msgpack.packb({"t": {"inject": 1}}),
])
def test_malformed_frames_raise_schema_error(frame: bytes) -> None:
    with pytest.raises(SchemaError):
        decode(frame)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_else(frame: bytes) -> None:
    with contextlib.suppress(SchemaError):
        decode(frame)


def test_domain_key_normalises_case_idn_and_trailing_dot() -> None:
    assert domain_key("Example.COM.") == "example.com"
    assert domain_key("Bücher.DE") == "xn--bcher-kva.de"
    assert domain_key("[192.0.2.1]") == "[192.0.2.1]"


def test_same_domain_same_shard_whatever_the_spelling() -> None:
    shards = ["a", "b", "c"]
    assert shard_for_domain("bücher.de", shards) == shard_for_domain("XN--BCHER-KVA.DE", shards)
    assert shard_for_address("user@Example.com", shards) == shard_for_domain("example.com", shards)
    assert shard_for_address("", shards) == 0


def test_ring_is_balanced_and_moves_little_when_a_shard_is_added() -> None:
    domains = [f"d{i}.test" for i in range(3000)]
    three = [shard_for_domain(d, ["a", "b", "c"]) for d in domains]
    counts = [three.count(i) for i in range(3)]
    assert min(counts) > 800, counts
    four = [shard_for_domain(d, ["a", "b", "c", "d"]) for d in domains]
    moved = sum(1 for x, y in zip(three, four, strict=True) if x != y)
    assert all(y == 3 for x, y in zip(three, four, strict=True) if x != y)
    assert 500 < moved < 1000  # about a quarter of the domains move, all to the new shard


@pytest.mark.parametrize(("sender", "recipients", "why"), [
    ("\x00@\x00", ["r@d.test"], "invalid sender"),  # the poison Inject once stored and retried forever
    ("a b@c.test", ["r@d.test"], "invalid sender"),
    ("a@b.test", ["r@d.test", "no-domain"], "invalid recipient"),
    ("a@b.test", ["Postmaster"], "no domain"),  # the SMTP server has already added its own domain
    ("a@b.test", ["r@bad_domain.test"], "invalid recipient"),
    ("a@b.test", ["r@d.test\r\nRCPT TO:<x@y.test>"], "invalid recipient"),
    ("a@b.test", [""], "invalid recipient"),
])
def test_inject_envelopes_are_checked_like_smtp(sender: str, recipients: list[str], why: str) -> None:
    frame = Inject(req=42, sender=sender, recipients=recipients, body=b"x").encode()
    with pytest.raises(SchemaError, match=why) as refused:
        decode(frame)
    assert refused.value.req == 42  # so the shard can answer Error(text, req=42) and the sender stops waiting


@pytest.mark.parametrize("sender", ["", "a@b.test", '"john doe"@b.test', "jörg@bücher.de", "a@[192.0.2.1]"])
def test_envelopes_the_smtp_server_accepts_pass(sender: str) -> None:
    inject = Inject(req=1, sender=sender, recipients=["x@xn--bcher-kva.de", "y@[IPv6:2001:db8::1]"], body=b"")
    assert decode(inject.encode()) == inject


@pytest.mark.parametrize("payload", [
    {"t": "inject", "req": 1, "sender": "", "recipients": ["r@d.test"], "body": b"", "client": {"ip": 1}},
    {"t": "heartbeat", "worker": "w", "free": -1, "in_flight": []},
    {"t": "heartbeat", "worker": "w", "free": 1, "in_flight": ["j", None]},
    {"t": "deliver", "job_id": "j", "queue_id": "q", "sender": "", "recipients": [b"r@d.test"], "domain": "d",
     "body": b"", "attempt": 1},
    {"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {"recipient": 5, "status": "delivered", "code": 250, "enhanced": "", "text": ""}]},
    {"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {"recipient": "r", "status": "sent", "code": 250, "enhanced": "2.0.0", "text": ""}]},
    {"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {"recipient": "r", "status": "delivered", "code": 550, "enhanced": "5.0.0", "text": ""}]},
    {"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {"recipient": "r", "kind": "expired", "code": 451, "enhanced": "4.4.7", "text": ""}]},
    {"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {"recipient": "r", "kind": "delivered", "code": 250, "enhanced": "2.0.0", "text": "", "port": -25}]},
    {"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {"recipient": "r", "kind": "delivered", "code": 250, "enhanced": "2.0.0", "text": "",
         "transfer_seconds": "1"}]},
    {"t": "result", "job_id": "j", "worker": "w", "outcomes": "none"},
    {"t": "result", "job_id": "j", "worker": "w", "outcomes": [["r", "delivered"]]},
    {"t": "inject_refused", "req": 1, "code": 250, "enhanced": "2.0.0", "text": "ok?"},
    {"t": "admin", "req": 1, "op": "", "args": {}},
    {"t": "error", "text": "x", "req": True},
])
def test_every_field_is_checked(payload: dict[str, object]) -> None:
    with pytest.raises(SchemaError):
        decode(msgpack.packb(payload))


def test_typed_outcomes_round_trip_and_a_previous_worker_is_understood() -> None:
    outcome = Outcome("r@d.test", OutcomeKind.FAILED, 550, "5.1.1", "no such user", "mx[192.0.2.1]", 25, 0.5, 0.25)
    (decoded,) = cast(Result, decode(Result("j", "w", [outcome]).encode())).outcomes
    assert decoded == outcome and decoded.kind is OutcomeKind.FAILED
    old = msgpack.packb({"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {"recipient": "r@d.test", "status": "deferred", "code": 451, "enhanced": "4.4.1", "text": "busy"}]})
    (legacy,) = cast(Result, decode(old)).outcomes
    assert legacy.kind is OutcomeKind.DEFERRED and (legacy.code, legacy.enhanced, legacy.port) == (451, "4.4.1", 0)


_GOOD_OUTCOME = {"recipient": "r@d.test", "kind": "delivered", "code": 250, "enhanced": "2.0.0", "text": "ok",
                 "remote": "mx[192.0.2.1]", "port": 25, "connect_seconds": 0, "transfer_seconds": 0.25}


@pytest.mark.parametrize("change", [
    {"recipient": 5}, {"recipient": None}, {"kind": "sent"}, {"kind": "expired", "code": 451}, {"kind": 2},
    {"code": 550}, {"code": 99}, {"code": 600}, {"code": True}, {"code": 250.0}, {"enhanced": None},
    {"text": b"ok"}, {"remote": 1}, {"port": -1}, {"port": True}, {"connect_seconds": -0.5},
    {"transfer_seconds": "1"}, {"text": ...}, {"kind": ...}, {"code": ..., "extra": 1}, {"port": "25", "x": 1},
])
def test_an_outcome_a_worker_could_send_is_checked_field_by_field(change: dict[str, object]) -> None:
    """Every check of an outcome, on the quick way a worker's well-formed outcomes take (`kind`, not the
    previous release's `status`); `...` removes the field."""
    item = {k: v for k, v in {**_GOOD_OUTCOME, **change}.items() if v is not ...}
    with pytest.raises(SchemaError):
        decode(msgpack.packb({"t": "result", "job_id": "j", "worker": "w", "outcomes": [item]}))


def test_a_worker_s_result_frame_is_the_result_s_own_encoding() -> None:
    outcomes = [Outcome("r@d.test", OutcomeKind.DELIVERED, 250, "2.0.0", "ok", "mx[192.0.2.1]", 25, 0.25, 0.5),
                Outcome("s@d.test", OutcomeKind.FAILED, 550, "5.1.1", "no such user \u00e9", "mx", 2525),
                Outcome("t@d.test", OutcomeKind.DEFERRED, 451, "4.4.2", "later")]
    for some in ([], outcomes[:1], outcomes):
        frame = schemas.result_frame("job-1", "worker-a", some)
        assert frame == Result("job-1", "worker-a", some).encode()
        assert decode(frame) == Result("job-1", "worker-a", some)


def test_outcomes_travel_as_plain_maps_and_come_back_equal() -> None:
    outcomes = [Outcome(f"r{i}@d.test", OutcomeKind.DEFERRED, 451, "4.2.0", "later", "mx[192.0.2.1]", 25, 0.5, i)
                for i in range(3)] + [Outcome("s@d.test", OutcomeKind.DELIVERED, 250, "2.0.0", "ok")]
    frame = Result("j", "w", outcomes).encode()
    wire = msgpack.unpackb(frame)["outcomes"]
    assert wire[0] == {"recipient": "r0@d.test", "kind": "deferred", "code": 451, "enhanced": "4.2.0", "text": "later",
                       "remote": "mx[192.0.2.1]", "port": 25, "connect_seconds": 0.5, "transfer_seconds": 0}
    assert type(wire[0]["kind"]) is str
    decoded = cast(Result, decode(frame)).outcomes
    assert decoded == outcomes and all(o.kind.__class__ is OutcomeKind for o in decoded)
    (minimal,) = cast(Result, decode(msgpack.packb({"t": "result", "job_id": "j", "worker": "w", "outcomes": [
        {k: _GOOD_OUTCOME[k] for k in ("recipient", "kind", "code", "enhanced", "text")}]}))).outcomes
    assert minimal == Outcome("r@d.test", OutcomeKind.DELIVERED, 250, "2.0.0", "ok")
    assert dataclasses.replace(minimal, port=25).port == 25 and hash(minimal) == hash(
        Outcome("r@d.test", "delivered", 250, "2.0.0", "ok"))  # type: ignore[arg-type]


def test_odd_reply_codes_are_deferrals_and_errors_name_their_request() -> None:
    odd = Result(job_id="j", worker="w", outcomes=[Outcome("r@d.test", "deferred", 354, "4.0.0", "odd")])
    assert decode(odd.encode()) == odd
    assert decode(Error(text="bad frame", req=3).encode()) == Error("bad frame", 3)
    assert decode(msgpack.packb({"t": "error", "text": "old style"})) == Error("old style", 0)


_ADDRESSY = st.text(alphabet="aZ09.-@_+!#~\"\\ [](),:;<>é\x00\r\n", min_size=0, max_size=80)
# Plain-looking addresses around the length limits: local part 64, label 63, path 256 (RFC 5321 4.5.3.1).
_NEAR_LIMITS = st.builds(lambda local, labels: "a" * local + "@" + ".".join("b" * n for n in labels),
                         st.integers(1, 70), st.lists(st.integers(1, 70), min_size=1, max_size=5))


@given(st.one_of(_ADDRESSY, _NEAR_LIMITS))
def test_the_fast_path_accepts_only_what_the_smtp_parser_accepts(address: str) -> None:
    if is_plain_address(address):
        # The full grammar, without the fast path that parse_forward_path / parse_reverse_path take first.
        parsed = full_parse(f"<{address}>", smtputf8=True, error=replies.bad_recipient)  # raises if too lenient
        assert parsed.domain
        assert parse_forward_path(f"<{address}>") == parsed == parse_reverse_path(f"<{address}>")


# The fast path's first form, one regex: the grammar the fast path still accepts, exactly.
_PLAIN_REFERENCE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
# Mostly well-formed addresses with a stray dot or hyphen here and there.
_DOTS_AND_HYPHENS = st.builds(lambda local, domain: "".join(local) + "@" + "".join(domain),
                              st.lists(st.sampled_from(["a", "a", "a.", ".", "-"]), min_size=1, max_size=5),
                              st.lists(st.sampled_from(["b", "b", "b.", ".", "-", "b-"]), min_size=1, max_size=6))


@settings(max_examples=1000)
@given(st.one_of(_DOTS_AND_HYPHENS, _NEAR_LIMITS, _ADDRESSY))
def test_the_fast_path_is_the_everyday_grammar(address: str) -> None:
    expected = (len(address) <= 254 and _PLAIN_REFERENCE.fullmatch(address) is not None
                and address.index("@") <= 64)
    assert is_plain_address(address) is expected


@pytest.mark.parametrize(("address", "plain"), [
    ("a" * 64 + "@d.test", True), ("a" * 65 + "@d.test", False), ("a@" + "b" * 63 + ".test", True),
    ("a@b" * 2, False), (".a@d.test", False), ("a.@d.test", False), ("a@d.test.", False), ("a@d-.test", False),
    ("a@d..test", False), ("a@.d", False), ("a@d.-test", False), ("a@d-", False), ("a-@d-d.test", True),
    ("@d.test", False), ("a@", False),
    ("a@" + "b" * 64 + ".test", False), ("a@" + ".".join(["b" * 63] * 3) + "." + "c" * 60, True),
    ("a@" + ".".join(["b" * 63] * 3) + "." + "c" * 61, False), ("a..b@d.test", False), ("a@-d.test", False),
])
def test_the_fast_path_at_the_limits(address: str, plain: bool) -> None:
    assert is_plain_address(address) is plain
    assert (recipient_problem(address) is None) is plain  # the parser agrees where the fast path says no


def _field_by_field(message: BusMessage) -> bytes:
    payload = {f.name: schemas._to_wire(getattr(message, f.name)) for f in dataclasses.fields(message)}
    payload["t"] = message.TYPE
    return cast(bytes, msgpack.packb(payload, use_bin_type=True))


@pytest.mark.parametrize("message", [
    Stored(7, "Q1"), InjectRefused(7, 452, "4.3.1", "full"), Error("bad", 3), Error(OutcomeKind.FAILED),
    Deliver("j", "q", "s@x.test", ["a@b.test", "c@b.test"], "b.test", b"\x00body", 1, 5, "e", 1, "p", 2, "s"),
    HeartbeatAck(0, "ep", 1, 5, ["a"], [], "serving"), Heartbeat("w", 3, ["a"], 1, "e", 1, 2.5, ["b"]),
    Inject(1, "a@b.test", ["c@d.test"], b"body", {"ip": "1"}), Granted(1, "e", 1, 2), AuthStatus(1, 2, 0.5),
    Transfer(1, "q", 0, "a@b.test", 1.5, False, {"a": "b"},
             [{"address": "x@y.test", "state": "ready", "attempts": 0, "next_attempt": 0.0, "last": None}], b"b"),
    Result("j", "w", [Outcome("a@b.test", OutcomeKind.DELIVERED, 250, "2.0.0", "ok", "mx[1.2.3.4]", 25)]),
    AdminReply(1, True, {"rows": [("a", 1)]}),
])
def test_a_frame_encoded_at_once_is_the_field_by_field_frame(message: BusMessage) -> None:
    """Issue 12: a message of plain fields is packed from its dict in one call; the bytes are the same as the
    field-by-field encoding's, so a peer of any release reads it alike."""
    assert message.encode() == _field_by_field(message)
    assert decode(message.encode()) == message or isinstance(message, AdminReply)


def test_a_value_msgpack_cannot_pack_still_fails_as_before() -> None:
    with pytest.raises(TypeError):
        Error(cast(str, object())).encode()
    assert Error("next", 1).encode() == _field_by_field(Error("next", 1))  # the packer is clean again
FULL_DELIVER = {"t": "deliver", "job_id": "j", "queue_id": "q", "sender": "s@o.test", "recipients": ["r@d.test"],
                "domain": "d.test", "body": b"b", "attempt": 1, "seq": 4, "epoch": "e", "incarnation": 2,
                "pool": "", "max_deliveries": 0, "source": ""}


def test_a_full_deliver_takes_the_plain_path_and_equals_the_general_one() -> None:
    plain = decode(msgpack.packb(FULL_DELIVER))
    general = Deliver(**{k: v for k, v in FULL_DELIVER.items() if k != "t"})  # type: ignore[arg-type]
    assert plain == general and hash(plain.job_id) == hash(general.job_id)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain.job_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize("change", [
    {"seq": -1}, {"attempt": True}, {"incarnation": 1.0}, {"recipients": ["r@d.test", 5]}, {"body": "text"},
    {"epoch": None}, {"max_deliveries": "0"}, {"source": b"s"}, {"queue_id": 7},
])
def test_a_full_deliver_with_one_bad_field_is_still_refused(change: dict[str, object]) -> None:
    with pytest.raises(SchemaError):
        decode(msgpack.packb({**FULL_DELIVER, **change}))


# Fields a later release might add (ARCHITECTURE.md, the bus: a field this release does not know is ignored).
LATER = {"batch": [1, 2], "compact": {"k": b"v"}, "status": "sent", "z": None}


def _with_later_fields(frame: bytes) -> bytes:
    payload = msgpack.unpackb(frame)
    payload.update(LATER)
    for item in payload.get("outcomes", []):
        item.update(LATER)
    return cast(bytes, msgpack.packb(payload, use_bin_type=True))


@pytest.mark.parametrize("message", [
    Stored(7, "Q1"), Error("bad", 3), InjectRefused(7, 452, "4.3.1", "full"),
    Inject(1, "a@b.test", ["c@d.test"], b"body", {"ip": "1"}),
    Deliver("j", "q", "s@x.test", ["a@b.test"], "b.test", b"\x00body", 1, 5, "e", 1, "p", 2, "s"),
    Deliver("j", "q", "", ["a@b.test"], "b.test", b"b", 1),
    Heartbeat("w", 3, ["a"], 1, "e", 1, 2.5, ["b"]), HeartbeatAck(0, "ep", 1, 5, ["a"], [], "serving"),
    Result("j", "w", [Outcome("a@b.test", OutcomeKind.DELIVERED, 250, "2.0.0", "ok", "mx[1.2.3.4]", 25, 0.5, 1),
                      Outcome("c@b.test", OutcomeKind.DEFERRED, 451, "4.4.1", "busy")]),
    Transfer(1, "q", 0, "a@b.test", 1.5, False, {"a": "b"},
             [{"address": "x@y.test", "state": "ready", "attempts": 0, "next_attempt": 0.0, "last": None}], b"b"),
    AdminRequest(1, "ping"), Granted(1, "e", 1, 2), AuthStatus(1, 2, 0.5),
])
def test_fields_of_a_later_release_are_ignored(message: BusMessage) -> None:
    """A later release may add optional fields (batching, a compact Result) during a rolling upgrade: this
    release reads the message as if they were not there, nested outcomes too, on the fast paths as on the
    checked ones, and writes it back byte for byte as it would have."""
    decoded = decode(_with_later_fields(message.encode()))
    assert decoded == message
    assert decoded.encode() == message.encode()


def test_a_transferred_recipient_with_fields_of_a_later_release_is_stored_alike() -> None:
    """A Transfer's recipient maps are read field by field (cluster/queue/transfer.py): unknown ones, there
    and in the last outcome, change nothing that is stored."""
    last = {"kind": "deferred", "code": 451, "enhanced": "4.4.1", "text": "busy", "remote": "mx"}
    sent = Transfer(1, "q", 0, "a@b.test", 1.5, False, {}, [{"address": "x@y.test", "state": "deferred",
                                                            "attempts": 2, "next_attempt": 9.5, "last": last}], b"b")
    payload = msgpack.unpackb(sent.encode())
    payload["recipients"][0].update(LATER)
    payload["recipients"][0]["last"].update(LATER)
    later = cast(Transfer, decode(msgpack.packb(payload, use_bin_type=True)))
    assert message_of(later).recipients == message_of(sent).recipients


def _outcome_maps() -> st.SearchStrategy[dict[str, object]]:
    """Outcome maps near a worker's: each field kept, left out or given an odd value; unknown fields added."""
    odd = st.sampled_from([None, -1, 0, 99, 250, 354, 451, 550, 600, 1.5, -0.5, "", "x", b"x", True,
                           "delivered", "deferred", "failed", "expired", [], {}])
    changes = st.dictionaries(st.sampled_from(sorted(_GOOD_OUTCOME)), st.one_of(st.just(...), odd), max_size=3)
    later = st.dictionaries(st.sampled_from(["status", "batch", "zz", "kind2"]), odd, max_size=2)
    return st.builds(lambda change, extra: {k: v for k, v in {**_GOOD_OUTCOME, **change, **extra}.items()
                                            if v is not ...}, changes, later)


def _checked_or_none(check: Callable[[], object]) -> object:
    try:
        return check()
    except SchemaError:
        return None


@settings(max_examples=500)
@given(_outcome_maps())
def test_the_fast_outcome_path_agrees_with_the_checked_one(item: dict[str, object]) -> None:
    """Whatever the fast path takes, the checked path takes alike (and its dict is the fields in their order);
    unknown fields change neither; a Result decodes its outcome as the checked path does."""
    checked = _checked_or_none(lambda: schemas._checked_outcome(dict(item)))
    fast = schemas._well_formed_outcome(dict(item))
    if fast is not None:
        assert fast == checked and tuple(fast.__dict__) == tuple(f.name for f in dataclasses.fields(Outcome))
    if "kind" in item or "status" not in item:  # "status" without "kind" is a previous release's kind
        known = {k: v for k, v in item.items() if k in _GOOD_OUTCOME}
        assert _checked_or_none(lambda: schemas._checked_outcome(known)) == checked
    frame = msgpack.packb({"t": "result", "job_id": "j", "worker": "w", "outcomes": [item]})
    decoded = _checked_or_none(lambda: cast(Result, decode(frame)).outcomes)
    assert decoded == (None if checked is None else [checked])


def _deliver_maps() -> st.SearchStrategy[dict[str, object]]:
    odd = st.sampled_from([None, -1, 0, 3, 1.0, "", "x", b"x", True, [], ["r@d.test"], ["r@d.test", 5]])
    names = sorted(k for k in FULL_DELIVER if k != "t")
    changes = st.dictionaries(st.sampled_from(names), st.one_of(st.just(...), odd), max_size=2)
    later = st.dictionaries(st.sampled_from(["batch", "compact", "zz"]), odd, max_size=2)
    return st.builds(lambda change, extra: {k: v for k, v in {**FULL_DELIVER, **change, **extra}.items()
                                            if v is not ...}, changes, later)


@settings(max_examples=500)
@given(_deliver_maps())
def test_the_plain_deliver_path_agrees_with_the_checked_one(payload: dict[str, object]) -> None:
    fields = {k: v for k, v in payload.items() if k != "t"}
    checked = _checked_or_none(lambda: schemas._checked_message(Deliver, dict(fields)))
    plain = schemas._plain_deliver(dict(fields))
    if plain is not None:
        assert plain == checked
    known = {k: v for k, v in fields.items() if k in FULL_DELIVER}
    assert _checked_or_none(lambda: schemas._checked_message(Deliver, known)) == checked
    assert _checked_or_none(lambda: decode(msgpack.packb(payload))) == checked
