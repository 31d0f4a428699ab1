"""MTA-STS (RFC 8461): TXT and policy parsing, mx patterns, and the policy cache on a virtual clock."""

from __future__ import annotations

import ssl

import pytest

from cluster.delivery.mta_sts import MtaSts, PolicyError, _http_body, mx_matches, parse_policy, parse_txt

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.backup.example.com\r\nmax_age: 86400\r\n"


def test_txt_record() -> None:
    assert parse_txt(["v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert parse_txt([]) is None
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # RFC 8461 3.1: several records = none
    assert parse_txt(["v=STSv1; id=not-alnum!"]) is None


def test_policy_parsing() -> None:
    policy = parse_policy(POLICY, "id1")
    assert (policy.mode, policy.mx, policy.max_age, policy.policy_id) == (
        "enforce", ("mx1.example.com", "*.backup.example.com"), 86400, "id1")
    assert parse_policy(POLICY.replace("\r\n", "\n") + "unknown: key\n").mx == policy.mx
    for bad in (POLICY.replace("STSv1", "STSv2"), POLICY.replace("enforce", "strict"),
                POLICY.replace("86400", "forever"), POLICY.replace("86400", "31557601"),
                "version: STSv1\nmode: enforce\nmax_age: 10\n"):
        with pytest.raises(PolicyError):
            parse_policy(bad)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 10\n").mx == ()


def test_mx_patterns_match_one_leftmost_label() -> None:
    assert mx_matches("mx1.example.com", "MX1.example.com.")
    assert mx_matches("*.example.com", "mx2.example.com")
    assert not mx_matches("*.example.com", "a.b.example.com")
    assert not mx_matches("*.example.com", "example.com")
    assert not mx_matches("mx1.example.com", "mx1.example.com.evil.test")


def test_http_answers() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello junk"
    assert _http_body(ok, "d") == "hello"
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n")
    assert _http_body(chunked, "d") == "hello"
    for bad in (b"HTTP/1.1 301 Moved\r\nLocation: https://x/\r\nContent-Type: text/plain\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\nx", b"garbage"):
        with pytest.raises(PolicyError):
            _http_body(bad, "d")


class FakeDns:
    def __init__(self) -> None:
        self.records: dict[str, list[str] | None] = {}
        self.txt_queries = 0
        self.fetches = 0
        self.policy_text = POLICY
        self.fail_fetch = False

    async def txt(self, name: str) -> list[str] | None:
        self.txt_queries += 1
        return self.records.get(name, [])

    async def addresses(self, host: str) -> list[str]:
        return ["127.0.0.1"]

    async def fetch(self, domain: str) -> str:
        self.fetches += 1
        if self.fail_fetch:
            raise PolicyError("connection refused")
        return self.policy_text


def make(dns: FakeDns, now: list[float]) -> MtaSts:
    return MtaSts(dns.txt, dns.addresses, ssl.create_default_context(), clock=lambda: now[0], fetch=dns.fetch)


async def test_policy_cache_follows_the_txt_id_and_max_age() -> None:
    dns, now = FakeDns(), [1000.0]
    sts = make(dns, now)
    assert await sts.policy("none.test") is None
    dns.records["_mta-sts.example.com"] = ["v=STSv1; id=one"]
    policy = await sts.policy("example.com")
    assert policy is not None and policy.mode == "enforce" and dns.fetches == 1
    # Within the recheck interval: no DNS query, no fetch.
    queries = dns.txt_queries
    assert await sts.policy("Example.COM.") == policy and dns.txt_queries == queries
    # Later, same id: the TXT record is checked, the policy is not fetched again.
    now[0] += 600
    assert await sts.policy("example.com") == policy and dns.fetches == 1 and dns.txt_queries == queries + 1
    # The TXT record vanishes or the fetch fails: the cached policy stays in force until max_age (RFC 8461 5.1).
    dns.records["_mta-sts.example.com"] = None
    now[0] += 600
    assert await sts.policy("example.com") == policy
    dns.records["_mta-sts.example.com"] = ["v=STSv1; id=two"]
    dns.fail_fetch = True
    now[0] += 600
    assert await sts.policy("example.com") == policy and dns.fetches == 2
    # A new id and a good fetch: the new policy replaces it.
    dns.fail_fetch = False
    dns.policy_text = POLICY.replace("enforce", "testing")
    now[0] += 600
    replaced = await sts.policy("example.com")
    assert replaced is not None and replaced.mode == "testing"
    # After max_age without a record, there is no policy any more.
    dns.records["_mta-sts.example.com"] = []
    now[0] += 86400
    assert await sts.policy("example.com") is None


async def test_no_cached_policy_and_a_failed_fetch_means_no_policy() -> None:
    dns, now = FakeDns(), [0.0]
    dns.records["_mta-sts.example.com"] = ["v=STSv1; id=one"]
    dns.fail_fetch = True
    assert await make(dns, now).policy("example.com") is None
