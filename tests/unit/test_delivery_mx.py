"""MX resolution with the test resolver: order, shuffle of equal preferences, implicit MX, null MX, DNS errors,
address limits, and the TTL cache."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cluster.delivery.mx import (
    CachingMxResolver,
    DnsFailure,
    DnsMxResolver,
    StaticMxResolver,
    Target,
    find_targets,
    ip_literal,
    order_mx,
)
from cluster.delivery.routing import SmtpRoute

ZONE = """
multi.test   MX 20 b.multi.test
multi.test   MX 10 a1.multi.test
multi.test   MX 10 a2.multi.test
multi.test   MX 30 c.multi.test
a1.multi.test A 192.0.2.1
a2.multi.test A 192.0.2.2
b.multi.test  A 192.0.2.3
b.multi.test  AAAA 2001:db8::3
c.multi.test  A 192.0.2.4
implicit.test A 192.0.2.9
nullmx.test  MX 0 .
broken.test  SERVFAIL
slow.test    TIMEOUT
half.test    MX 10 gone.half.test
half.test    MX 20 ok.half.test
ok.half.test A 192.0.2.20
empty.test   MX 10 gone.empty.test
lame.test    MX 10 broken.test
nomail.test  AAAA 2001:db8::1
"""


def resolver() -> StaticMxResolver:
    return StaticMxResolver.from_zone_text(ZONE)


def mx(domain: str) -> SmtpRoute:
    return SmtpRoute(domain, 25, mx_lookup=True)


async def test_lowest_preference_first_and_max_addresses() -> None:
    targets = await find_targets(resolver(), mx("multi.test"), 5, random.Random(1))
    assert isinstance(targets, list)
    names = [t.name for t in targets]
    assert set(names[:2]) == {"a1.multi.test", "a2.multi.test"}
    assert names[2:] == ["b.multi.test", "b.multi.test", "c.multi.test"]
    assert targets[3].address == "2001:db8::3"
    limited = await find_targets(resolver(), mx("multi.test"), 3, random.Random(1))
    assert isinstance(limited, list) and len(limited) == 3


async def test_equal_preferences_are_shuffled() -> None:
    firsts = Counter()
    for seed in range(40):
        targets = await find_targets(resolver(), mx("multi.test"), 5, random.Random(seed))
        assert isinstance(targets, list)
        firsts[targets[0].name] += 1
    assert set(firsts) == {"a1.multi.test", "a2.multi.test"}


def test_order_mx_removes_duplicates_and_final_dots() -> None:
    assert order_mx([(10, "A.example."), (5, "b.example"), (10, "a.example")], random.Random(0)) == [
        "b.example", "a.example"]


async def test_implicit_mx_when_there_is_no_mx_record() -> None:
    assert await find_targets(resolver(), mx("implicit.test"), 5) == [Target("implicit.test", "192.0.2.9", 25)]


async def test_dns_outcomes() -> None:
    cases = {
        "nullmx.test": DnsFailure(556, "5.1.10", ""),
        "nosuch.test": DnsFailure(550, "5.1.2", ""),
        "broken.test": DnsFailure(451, "4.4.3", ""),
        "slow.test": DnsFailure(451, "4.4.3", ""),
        "empty.test": DnsFailure(451, "4.4.4", ""),
        "lame.test": DnsFailure(451, "4.4.3", ""),
    }
    for domain, expected in cases.items():
        found = await find_targets(resolver(), mx(domain), 5)
        assert isinstance(found, DnsFailure), domain
        assert (found.code, found.enhanced) == (expected.code, expected.enhanced), domain
        assert domain in found.text or "broken.test" in found.text


async def test_mx_host_without_address_is_skipped() -> None:
    assert await find_targets(resolver(), mx("half.test"), 5) == [Target("ok.half.test", "192.0.2.20", 25)]


async def test_ipv6_only_implicit_mx_and_address_literals() -> None:
    assert await find_targets(resolver(), mx("nomail.test"), 5) == [Target("nomail.test", "2001:db8::1", 25)]
    assert await find_targets(resolver(), mx("[192.0.2.7]"), 5) == [Target("192.0.2.7", "192.0.2.7", 25)]
    assert ip_literal("[IPv6:2001:db8::1]") == "2001:db8::1"
    assert ip_literal("mx.example") is None


async def test_direct_route_skips_mx_and_localhost_needs_no_dns() -> None:
    route = SmtpRoute("a1.multi.test", 2525, mx_lookup=False)
    assert await find_targets(resolver(), route, 5) == [Target("a1.multi.test", "192.0.2.1", 2525)]
    local = SmtpRoute("localhost", 2525, mx_lookup=False)
    assert await find_targets(resolver(), local, 5) == [Target("localhost", "127.0.0.1", 2525)]


async def test_cache_keeps_answers_for_their_ttl_but_not_failures() -> None:
    now = [0.0]
    inner = resolver()
    cached = CachingMxResolver(inner, clock=lambda: now[0], negative_ttl=10)
    for _ in range(3):
        await cached.mx("multi.test")
        await cached.mx("nosuch.test")
        await cached.mx("broken.test")
    assert inner.lookups == 5  # one each for the cached answers, three for the failure
    now[0] = 11.0
    await cached.mx("nosuch.test")  # negative entry expired
    await cached.mx("multi.test")  # positive entry (TTL 300) still valid
    assert inner.lookups == 6
    now[0] = 400.0
    await cached.mx("multi.test")
    assert inner.lookups == 7


def test_nameserver_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="must be an IP address"):
        DnsMxResolver(("dns.example:53",))
    DnsMxResolver(("127.0.0.1:5353", "[::1]"))
