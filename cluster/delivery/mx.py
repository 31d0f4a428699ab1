"""MX resolution: which addresses to try, in which order, for an SMTP route.

`MxResolver` is the small interface to DNS (two questions: the MX records of a name, the addresses of a host),
with three implementations:
- `DnsMxResolver`: dnspython's asyncio resolver, on `delivery.nameservers` or the system configuration;
- `StaticMxResolver`: answers from a dict or zone-like text, for tests;
- `CachingMxResolver`: wraps another one and keeps answers for their TTL (negative answers for a fixed time,
  temporary failures not at all).

`find_targets(resolver, route, max_addresses, rng)` turns a route into the ordered list of `Target`s to try, or
a `DnsFailure` that decides the recipients' outcome at once. Rules (RFC 5321 5.1, RFC 7505):
- MX records lowest preference first; hosts of equal preference in random order (load spreading);
- no MX records but the name exists (NOERROR/NODATA): the name itself is the only host (implicit MX);
- null MX (a single "0 ." record, RFC 7505): 556 5.1.10, permanent, at once;
- NXDOMAIN for the domain: 550 5.1.2 (bad destination system), permanent;
- SERVFAIL or timeout for the domain: 451 4.4.3 (directory server failure), deferred;
- an MX host without addresses is skipped; when no host has any address: 451 4.4.4 deferred (as KumoMTA does
  for "MX with no hosts": the zone may be mid-change, and a retry costs little), or 451 4.4.3 when an
  address lookup failed temporarily;
- at most `max_addresses` addresses in all (IPv4 before IPv6 for each host);
- "localhost" is 127.0.0.1 without asking DNS (RFC 6761 6.3; dnspython does not read /etc/hosts, so other
  names from there are unknown: configure IP addresses for hosts that are not in DNS).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from cluster.config import split_host_port
from cluster.delivery import metrics
from cluster.delivery.routing import SmtpRoute
from cluster.domains import domain_key

log = logging.getLogger(__name__)

# Lookup statuses. "ok" has records; the others have none.
OK, NXDOMAIN, NODATA, SERVFAIL, TIMEOUT = "ok", "nxdomain", "nodata", "servfail", "timeout"
TEMPORARY = (SERVFAIL, TIMEOUT)


@dataclass(frozen=True)
class MxLookup:
    status: str
    records: tuple[tuple[int, str], ...] = ()  # (preference, exchange host name without the final dot)
    ttl: float = 0.0


@dataclass(frozen=True)
class AddressLookup:
    status: str
    addresses: tuple[str, ...] = ()
    ttl: float = 0.0


class MxResolver(Protocol):
    async def mx(self, domain: str) -> MxLookup: ...

    async def addresses(self, host: str) -> AddressLookup: ...


@dataclass(frozen=True)
class Target:
    """One address to connect to. `label` is how replies name it: "mx1.example.net[192.0.2.1]"."""

    name: str
    address: str
    port: int

    @property
    def label(self) -> str:
        return f"{self.name}[{self.address}]"


@dataclass(frozen=True)
class DnsFailure:
    """DNS decided the outcome for every recipient of the route."""

    code: int
    enhanced: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@functools.lru_cache(maxsize=4096)
def ip_literal(host: str) -> str | None:
    """The address when `host` is an IP address or an RFC 5321 address literal ("[192.0.2.1]", "[IPv6:...]")."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text.lower().startswith("ipv6:"):
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


async def find_targets(resolver: MxResolver, route: SmtpRoute, max_addresses: int,
                       rng: random.Random | None = None) -> list[Target] | DnsFailure:
    literal = ip_literal(route.host)
    if literal is not None:
        return [_literal_target(route.host, literal, route.port)]
    rng = rng or random.Random()
    domain = domain_key(route.host)
    hosts: list[str]
    if route.mx_lookup:
        lookup = await resolver.mx(domain)
        records = [(pref, host) for pref, host in lookup.records if host not in ("", ".")]
        if lookup.status == OK and not records and lookup.records:
            # RFC 7505 3: a null MX says the domain accepts no mail.
            metrics.DNS_LOOKUPS.labels(result="null_mx").inc()
            return DnsFailure(556, "5.1.10", f"Domain {domain} does not accept mail (null MX, RFC 7505)")
        metrics.DNS_LOOKUPS.labels(result=lookup.status).inc()
        if lookup.status == NXDOMAIN:
            return DnsFailure(550, "5.1.2", f"Domain {domain} does not exist (DNS: NXDOMAIN)")
        if lookup.status in TEMPORARY:
            return DnsFailure(451, "4.4.3", f"Temporary DNS failure looking up MX of {domain} ({lookup.status})")
        hosts = order_mx(records, rng) if records else [domain]  # RFC 5321 5.1: implicit MX
    else:
        hosts = [domain]
    targets: list[Target] = []
    temporary_failure = False
    for host in hosts:
        if len(targets) >= max_addresses:
            break
        literal = ip_literal(host)
        if literal is None and (host == "localhost" or host.endswith(".localhost")):
            literal = "127.0.0.1"  # RFC 6761 6.3: always loopback, whatever DNS says (dnspython skips /etc/hosts)
        if literal is not None:
            targets.append(Target(host, literal, route.port))
            continue
        found = await resolver.addresses(host)
        if found.status in TEMPORARY:
            temporary_failure = True
        for address in found.addresses:
            if len(targets) >= max_addresses:
                break
            targets.append(Target(host, address, route.port))
    if targets:
        return targets
    if temporary_failure:
        return DnsFailure(451, "4.4.3", f"Temporary DNS failure looking up the addresses of {', '.join(hosts)}")
    return DnsFailure(451, "4.4.4", f"No address found for the mail hosts of {domain} ({', '.join(hosts)})")


@functools.lru_cache(maxsize=1024)
def _literal_target(host: str, address: str, port: int) -> Target:
    return Target(host.strip("[]"), address, port)


def order_mx(records: list[tuple[int, str]], rng: random.Random) -> list[str]:
    """RFC 5321 5.1: lowest preference first; equal preferences in random order; each host once."""
    by_preference: dict[int, list[str]] = {}
    for preference, host in records:
        by_preference.setdefault(preference, []).append(domain_key(host))
    ordered: list[str] = []
    for preference in sorted(by_preference):
        group = list(dict.fromkeys(by_preference[preference]))
        rng.shuffle(group)
        ordered.extend(host for host in group if host not in ordered)
    return ordered


class DnsMxResolver:
    """The real resolver: dnspython's asyncio stub resolver."""

    def __init__(self, nameservers: tuple[str, ...] = (), timeout: float = 10.0) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            servers: list[dns.nameserver.Nameserver | str] = []
            for server in nameservers:
                host, port = split_host_port(server, 53)
                if ip_literal(host) is None:
                    raise ValueError(f"dns.nameservers: {server!r} must be an IP address (optionally :port)")
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self._resolver.nameservers = servers
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                # No usable /etc/resolv.conf (some minimal containers): ask a resolver on this host, and let
                # the lookups fail as temporary errors (deferrals) if there is none.
                log.warning("no system DNS configuration; using 127.0.0.1 (set dns.nameservers)")
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = ["127.0.0.1"]
        self._resolver.lifetime = timeout

    async def _query(self, name: str, rdtype: str) -> tuple[str, dns.resolver.Answer | None]:
        try:
            answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return NXDOMAIN, None
        except dns.resolver.NoNameservers:
            # Every server answered SERVFAIL/REFUSED (or could not be reached).
            return SERVFAIL, None
        except dns.exception.Timeout:
            return TIMEOUT, None
        except dns.exception.DNSException:
            return SERVFAIL, None
        if answer.rrset is None:
            return NODATA, answer
        return OK, answer

    async def mx(self, domain: str) -> MxLookup:
        status, answer = await self._query(domain, "MX")
        if status != OK or answer is None or answer.rrset is None:
            return MxLookup(status)
        records = tuple((int(r.preference), r.exchange.to_text(omit_final_dot=True) or ".")
                        for r in answer.rrset)
        return MxLookup(OK, records, float(answer.rrset.ttl))

    async def txt(self, name: str) -> list[str] | None:
        """The TXT records of `name`, each record's strings joined; [] when there are none, None on failure."""
        status, answer = await self._query(name, "TXT")
        if status in (NXDOMAIN, NODATA):
            return []
        if status != OK or answer is None or answer.rrset is None:
            return None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]

    async def addresses(self, host: str) -> AddressLookup:
        found: list[str] = []
        statuses: list[str] = []
        ttl = 3600.0
        for rdtype in ("A", "AAAA"):
            status, answer = await self._query(host, rdtype)
            statuses.append(status)
            if status == OK and answer is not None and answer.rrset is not None:
                found.extend(r.address for r in answer.rrset)
                ttl = min(ttl, float(answer.rrset.ttl))
        if found:
            return AddressLookup(OK, tuple(found), ttl)
        for status in (SERVFAIL, TIMEOUT, NXDOMAIN):
            if status in statuses:
                return AddressLookup(status)
        return AddressLookup(NODATA)


class StaticMxResolver:
    """Answers from a table, for tests: name -> {"MX": [(pref, host)], "A": [ip], "AAAA": [ip]} or a status
    string ("servfail", "timeout"). Names not in the table are NXDOMAIN; a name without the asked type NODATA.
    `lookups` counts the questions asked, so tests can see the cache work."""

    def __init__(self, table: Mapping[str, Mapping[str, list[object]] | str]) -> None:
        self._table = {domain_key(name): entry for name, entry in table.items()}
        self.lookups = 0

    @classmethod
    def from_zone_text(cls, text: str) -> StaticMxResolver:
        """Lines "name MX pref host", "name A ip", "name AAAA ip", "name SERVFAIL", "name TIMEOUT";
        "#" starts a comment."""
        table: dict[str, dict[str, list[object]] | str] = {}
        for raw in text.splitlines():
            words = raw.split("#", 1)[0].split()
            if not words:
                continue
            name, kind = domain_key(words[0]), words[1].upper()
            if kind in ("SERVFAIL", "TIMEOUT"):
                table[name] = kind.lower()
                continue
            entry = table.setdefault(name, {})
            if isinstance(entry, str):
                raise ValueError(f"zone line {raw!r}: {name} is already {entry}")
            if kind == "MX":
                entry.setdefault("MX", []).append((int(words[2]), words[3].rstrip(".") or "."))
            elif kind in ("A", "AAAA"):
                entry.setdefault(kind, []).append(words[2])
            else:
                raise ValueError(f"zone line {raw!r}: unknown record type {kind}")
        return cls(table)

    def _entry(self, name: str) -> Mapping[str, list[object]] | str | None:
        self.lookups += 1
        return self._table.get(domain_key(name))

    async def mx(self, domain: str) -> MxLookup:
        entry = self._entry(domain)
        if entry is None:
            return MxLookup(NXDOMAIN)
        if isinstance(entry, str):
            return MxLookup(entry)
        records = tuple((int(str(pref)), str(host)) for pref, host in
                        (item for item in entry.get("MX", []) if isinstance(item, tuple)))
        return MxLookup(OK, records, 300.0) if records else MxLookup(NODATA)

    async def txt(self, name: str) -> list[str] | None:
        """TXT records from the table's "TXT" lists ([] when none); None for a SERVFAIL/TIMEOUT name."""
        entry = self._entry(name)
        if isinstance(entry, str):
            return None
        return [str(text) for text in entry.get("TXT", [])] if entry is not None else []

    async def addresses(self, host: str) -> AddressLookup:
        entry = self._entry(host)
        if entry is None:
            return AddressLookup(NXDOMAIN)
        if isinstance(entry, str):
            return AddressLookup(entry)
        found = tuple(str(a) for a in [*entry.get("A", []), *entry.get("AAAA", [])])
        return AddressLookup(OK, found, 300.0) if found else AddressLookup(NODATA)


_L = TypeVar("_L", MxLookup, AddressLookup)


class CachingMxResolver:
    """Keeps answers of another resolver: positive ones for their TTL (at most `max_ttl`), NXDOMAIN/NODATA
    for `negative_ttl`; temporary failures are not kept (the next attempt asks again). At most `max_entries`
    names per table (expired ones are dropped first)."""

    def __init__(self, inner: MxResolver, clock: Callable[[], float] = time.monotonic,
                 negative_ttl: float = 60.0, max_ttl: float = 3600.0, max_entries: int = 50000) -> None:
        self._inner = inner
        self._max_entries = max_entries
        self._clock = clock
        self._negative_ttl = negative_ttl
        self._max_ttl = max_ttl
        self._mx: dict[str, tuple[float, MxLookup]] = {}
        self._addresses: dict[str, tuple[float, AddressLookup]] = {}

    def _remember(self, table: dict[str, tuple[float, _L]], key: str, lookup: _L, status: str, ttl: float) -> None:
        expiry = self._expiry(status, ttl)
        if expiry is None:
            return
        if len(table) >= self._max_entries:
            now = self._clock()
            for stale in [k for k, (until, _) in table.items() if until <= now]:
                del table[stale]
            if len(table) >= self._max_entries:
                table.clear()  # all still valid: start over rather than grow without bound
        table[key] = (expiry, lookup)

    def _expiry(self, status: str, ttl: float) -> float | None:
        if status in TEMPORARY:
            return None
        keep = min(ttl, self._max_ttl) if status == OK else self._negative_ttl
        return self._clock() + keep if keep > 0 else None

    async def mx(self, domain: str) -> MxLookup:
        key = domain_key(domain)
        cached = self._mx.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        lookup = await self._inner.mx(key)
        self._remember(self._mx, key, lookup, lookup.status, lookup.ttl)
        return lookup

    async def txt(self, name: str) -> list[str] | None:
        """Passed through uncached (MTA-STS keeps what it learns, mta_sts.py); None when the inner resolver
        cannot look up TXT records."""
        inner = getattr(self._inner, "txt", None)
        return await inner(name) if inner is not None else None

    async def addresses(self, host: str) -> AddressLookup:
        key = domain_key(host)
        cached = self._addresses.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        lookup = await self._inner.addresses(key)
        self._remember(self._addresses, key, lookup, lookup.status, lookup.ttl)
        return lookup
