"""Egress sources and pools: configuration checks, which pool a message gets, which source a delivery uses."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cluster.bus.schemas import Deliver, decode
from cluster.config import ConfigError, config_from_dict
from cluster.delivery.egress import DEFAULT_SOURCE, EgressChooser
from cluster.frontend.outbound import Outbound

EGRESS = {
    "sources": {"a": {"address": "127.0.0.7", "helo_name": "out7.mta.test"}, "b": {"address": "127.0.0.8"},
                "c": {"address": "::1"}},
    "pools": {"default": ["a"], "bulk": ["a", {"source": "b", "weight": 3}], "six": ["c"]},
    "sender_domains": {"News.Example": "bulk"},
    "users": {"alice@example.org": "six"},
}


def test_pool_by_user_then_sender_domain_then_default() -> None:
    config = config_from_dict({"egress": EGRESS}, environ={})
    outbound = Outbound(None, config.egress)
    assert outbound.pool_for("x@news.example", "Alice@example.org") == "six"
    assert outbound.pool_for("x@NEWS.example", None) == "bulk"
    assert outbound.pool_for("x@news.example", "bob") == "bulk"
    assert outbound.pool_for("x@other.example", None) == "default"
    assert outbound.pool_for("", None) == "default"
    assert Outbound(None, config_from_dict({}, environ={}).egress).pool_for("x@news.example", None) == ""


def test_sources_are_chosen_by_weight() -> None:
    chooser = EgressChooser(config_from_dict({"egress": EGRESS}, environ={}).egress, random.Random(7))
    counts = Counter(chooser.choose("bulk").name for _ in range(4000))
    assert 2700 < counts["b"] < 3300 and counts["a"] == 4000 - counts["b"]
    source = chooser.choose("default")
    assert (source.name, source.address, source.helo_name) == ("a", "127.0.0.7", "out7.mta.test")
    assert chooser.choose("") is DEFAULT_SOURCE
    # A pool this worker does not know: the default pool, rather than no delivery.
    assert chooser.choose("renamed").name == "a"
    assert EgressChooser(config_from_dict({}, environ={}).egress).choose("bulk") is DEFAULT_SOURCE


def test_deliver_carries_the_pool_and_the_source() -> None:
    job = Deliver("j", "q", "s@x", ["r@y"], "y", b"body", 1, 3, pool="bulk", source="b")
    assert decode(job.encode()) == job
    plain = decode(Deliver("j", "q", "s@x", ["r@y"], "y", b"body", 1).encode())
    assert isinstance(plain, Deliver) and plain.pool == "" and plain.source == ""


def test_the_worker_uses_the_source_the_shard_chose() -> None:
    chooser = EgressChooser(config_from_dict({"egress": EGRESS}, environ={}).egress, random.Random(7))
    assert {chooser.for_job("a", "bulk").name for _ in range(200)} == {"a"}
    assert chooser.for_job("b", "bulk").address == "127.0.0.8"
    # No source (a shard of the previous release) or one this worker does not know: chosen from the pool.
    assert {chooser.for_job("", "bulk").name for _ in range(200)} == {"a", "b"}
    assert {chooser.for_job("gone", "bulk").name for _ in range(200)} == {"a", "b"}
    assert chooser.for_job("", "") is DEFAULT_SOURCE


@pytest.mark.parametrize(("egress", "key"), [
    ({"sources": {"a": {"address": "not-an-ip"}}}, "egress.sources.a.address"),
    ({"sources": {"a": {"helo_name": "bad name"}}}, "egress.sources.a.helo_name"),
    ({"sources": {"a": {}}, "pools": {"default": ["b"]}}, "egress.pools.default"),
    ({"sources": {"a": {}}, "pools": {"default": []}}, "egress.pools.default"),
    ({"sources": {"a": {}}, "pools": {"default": [{"source": "a", "weight": 0}]}}, "egress.pools.default"),
    ({"sources": {"a": {}}, "pools": {"default": ["a"]}, "sender_domains": {"x.test": "bulk"}},
     "egress.sender_domains.x.test"),
    ({"users": {"alice": "nowhere"}}, "egress.users.alice"),
    ({"sources": {"a": {"addr": "127.0.0.1"}}}, "egress.sources.a.addr"),
])
def test_bad_egress_configuration_names_the_key(egress: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"egress": egress}, environ={})
    assert caught.value.key == key
