"""Bus schemas round-trip and refuse malformed frames; the shard ring is stable and balanced."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.bus.ring import domain_key, shard_for_address, shard_for_domain
from cluster.bus.schemas import (
    AdminRequest,
    Deliver,
    Heartbeat,
    Inject,
    Outcome,
    Result,
    SchemaError,
    Stored,
    decode,
)


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


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"t": "nope"}), msgpack.packb({"req": 1}),
    msgpack.packb({"t": "stored", "req": 1}),
    msgpack.packb({"t": "stored", "req": "1", "queue_id": "q"}),
    msgpack.packb({"t": "stored", "req": 1, "queue_id": "q", "extra": 1}),
    msgpack.packb({"t": "inject", "req": 1, "sender": "", "recipients": [1], "body": b"", "client": {}}),
    msgpack.packb({"t": "result", "job_id": "j", "worker": "w", "outcomes": [{"bad": 1}]}),
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
