"""The connection cache: reuse per (source, address, port), idle timeout, most transactions per connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY

from cluster.delivery.connections import ConnectionCache
from cluster.delivery.egress import DEFAULT_SOURCE, Source
from cluster.delivery.mx import Target

MX = Target("mx.test", "192.0.2.1", 25)
OTHER = Target("mx2.test", "192.0.2.2", 25)


@dataclass
class FakeSession:
    target: Target
    transactions: int = 1
    source: Source = DEFAULT_SOURCE
    usable: bool = True
    closed: bool = False

    def close(self, polite: bool = False) -> None:
        self.closed = True


def cache_at(now: list[float], **kwargs: Any) -> ConnectionCache:
    return ConnectionCache(kwargs.get("idle", 30.0), kwargs.get("max_deliveries", 3), clock=lambda: now[0])


def test_reuse_only_for_the_same_destination() -> None:
    now = [0.0]
    cache = cache_at(now)
    session = FakeSession(MX)
    cache.give_back(session)  # type: ignore[arg-type]
    assert cache.take(OTHER) is None
    assert cache.take(MX) is session
    assert cache.take(MX) is None


def _lookups(result: str) -> float:
    return REGISTRY.get_sample_value("mtacluster_delivery_connection_cache_total", {"result": result}) or 0.0


def test_hits_and_misses_are_in_their_series_when_read() -> None:
    """Counted without a lock per lookup (cluster/observability.py `count`), yet a read sees every one."""
    hits, misses = _lookups("hit"), _lookups("miss")
    cache = cache_at([0.0])
    assert cache.take(MX) is None
    cache.give_back(FakeSession(MX))  # type: ignore[arg-type]
    assert cache.take(MX) is not None
    assert cache.take(MX) is None
    assert (_lookups("hit"), _lookups("miss")) == (hits + 1, misses + 2)


def test_reuse_only_from_the_same_egress_source() -> None:
    cache = cache_at([0.0])
    session = FakeSession(MX, source=Source("ip7", "127.0.0.7", "out7.test"))
    cache.give_back(session)  # type: ignore[arg-type]
    assert cache.take(MX) is None
    assert cache.take(MX, "ip8") is None
    assert cache.take(MX, "ip7") is session


def test_idle_sessions_expire_and_are_closed() -> None:
    now = [0.0]
    cache = cache_at(now)
    session = FakeSession(MX)
    cache.give_back(session)  # type: ignore[arg-type]
    now[0] = 31.0
    assert cache.take(MX) is None
    assert session.closed
    other = FakeSession(MX)
    cache.give_back(other)  # type: ignore[arg-type]
    now[0] = 62.0
    assert cache.prune() == 0 and other.closed and len(cache) == 0


def test_worn_out_or_dead_sessions_are_not_kept() -> None:
    now = [0.0]
    cache = cache_at(now)
    worn = FakeSession(MX, transactions=3)
    dead = FakeSession(MX, usable=False)
    cache.give_back(worn)  # type: ignore[arg-type]
    cache.give_back(dead)  # type: ignore[arg-type]
    assert worn.closed and dead.closed and len(cache) == 0


def test_close_all() -> None:
    now = [0.0]
    cache = cache_at(now)
    sessions = [FakeSession(MX), FakeSession(OTHER)]
    for session in sessions:
        cache.give_back(session)  # type: ignore[arg-type]
    cache.close_all()
    assert all(s.closed for s in sessions) and len(cache) == 0
