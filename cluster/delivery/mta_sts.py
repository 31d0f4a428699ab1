"""MTA-STS (RFC 8461): find, fetch and cache a recipient domain's policy, and say what it requires.

Inputs: a TXT lookup (`_mta-sts.DOMAIN`), an address lookup (for `mta-sts.DOMAIN`), the HTTPS port and an
optional extra CA file (`[mta_sts]`; both there for tests, 443 and the system trust store otherwise), a clock.
Output: `MtaSts.policy(domain) -> Policy | None`; `Policy.allows(mx_host)` applies its mx patterns.

How (RFC 8461 3 and 5.1): the TXT record `v=STSv1; id=...` says a policy exists; the policy itself is fetched
with HTTPS GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt (certificate checked for that name, no redirects,
2xx only, at most 64 KiB) and cached for its max_age. A cached policy is fetched again only when the TXT id
changes; the TXT record is checked at most every `RECHECK` seconds per domain (absence too), so a busy
destination costs no DNS query per delivery. Concurrent deliveries to one domain share one lookup.
What the caller does with it (cluster/delivery/deliver.py): mode "enforce": only MX hosts that match, and only
over TLS whose certificate verifies for the MX name, else defer with 4.7.5; "testing": deliver as without a
policy and log what would have failed; "none": no policy.

Failure modes: DNS errors, an unreachable policy host, a bad certificate, a non-2xx answer or an unparsable
policy never raise: with a cached, unexpired policy that policy stays in force (RFC 8461 5.1), else the
domain has no policy (mail is delivered as without MTA-STS) and the failure is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cluster.config import ConfigError
from cluster.delivery import metrics

log = logging.getLogger(__name__)

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_POLICY_SIZE = 64 * 1024
# RFC 8461 3.2: max_age is at most 31557600 seconds (one year).
MAX_AGE_LIMIT = 31_557_600
RECHECK = 300.0
MODES = ("enforce", "testing", "none")

TxtLookup = Callable[[str], Awaitable[list[str] | None]]  # TXT strings joined per record; None = lookup failed
AddressLookup = Callable[[str], Awaitable[list[str]]]

_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}")


def verifying_context(ca_file: str = "") -> ssl.SSLContext:
    """Certificates checked against the system store, plus `ca_file` when given (`mta_sts.ca_file`, for tests)."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("mta_sts.ca_file", f"cannot load CA certificates from {ca_file}: {exc}") from None
    return context


class PolicyError(ValueError):
    """A policy could not be fetched or parsed; the message says why."""


@dataclass(frozen=True)
class Policy:
    mode: str
    mx: tuple[str, ...]
    max_age: int
    policy_id: str = ""

    def allows(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: exact (case-insensitive) or "*." matching exactly one leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == host


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the `_mta-sts` TXT records, or None (no record, several, or malformed; RFC 8461 3.1)."""
    sts = [r for r in records if r.startswith("v=STSv1")]
    if len(sts) != 1:
        return None
    fields = dict(part.strip().partition("=")[::2] for part in sts[0].split(";") if part.strip())
    policy_id = fields.get("id", "")
    return policy_id if _STS_ID.fullmatch(policy_id) else None


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """RFC 8461 3.2: "key: value" lines (CRLF or LF); version STSv1, mode, max_age, one mx per line."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"mode is {mode!r}, not enforce, testing or none")
    try:
        max_age = int(fields.get("max_age", ""))
    except ValueError:
        raise PolicyError(f"max_age is {fields.get('max_age')!r}, not a number of seconds") from None
    if not 0 <= max_age <= MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {max_age} is out of range 0-{MAX_AGE_LIMIT}")
    if mode != "none" and not mx:
        raise PolicyError("no mx lines")
    return Policy(mode, tuple(mx), max_age, policy_id)


async def fetch_policy_text(domain: str, addresses: AddressLookup, context: ssl.SSLContext, port: int,
                            timeout: float) -> str:
    """HTTPS GET of the policy (RFC 8461 3.3); PolicyError for anything but a 2xx text answer."""
    host = f"mta-sts.{domain}"
    found = await addresses(host)
    if not found:
        raise PolicyError(f"{host} has no address")
    request = (f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mtacluster\r\n"
               f"Accept: text/plain\r\nConnection: close\r\n\r\n").encode("ascii")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(found[0], port, ssl=context, server_hostname=host)
            try:
                writer.write(request)
                await writer.drain()
                response = await reader.read(MAX_POLICY_SIZE + 8192)
                extra = await reader.read(1)
            finally:
                writer.close()
    except TimeoutError:
        raise PolicyError(f"no answer from https://{host}:{port} within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise PolicyError(f"https://{host}:{port}: {exc}") from None
    if extra:
        raise PolicyError(f"the policy of {domain} is larger than {MAX_POLICY_SIZE} bytes")
    return _http_body(response, domain)


def _http_body(response: bytes, domain: str) -> str:
    head, separator, body = response.partition(b"\r\n\r\n")
    if not separator:
        raise PolicyError(f"malformed HTTP answer for the policy of {domain}")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].startswith("2"):
        # RFC 8461 3.3: redirects are not followed; any non-2xx means no policy.
        raise PolicyError(f"HTTP status {' '.join(status[1:]) or '?'} for the policy of {domain}")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if not headers.get("content-type", "").lower().startswith("text/plain"):
        raise PolicyError(f"the policy of {domain} is not text/plain")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers and headers["content-length"].isdigit():
        body = body[:int(headers["content-length"])]
    return body.decode("utf-8", "replace")


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise PolicyError("malformed chunked HTTP body") from None
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


@dataclass
class _Entry:
    policy: Policy | None
    expires: float  # the policy's end of life (arrival + max_age)
    checked: float  # when the TXT record was last looked at


class MtaSts:
    def __init__(self, txt: TxtLookup, addresses: AddressLookup, context: ssl.SSLContext, port: int = 443,
                 timeout: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 fetch: Callable[[str], Awaitable[str]] | None = None) -> None:
        self._txt = txt
        self._addresses = addresses
        self._context = context
        self._port = port
        self._timeout = timeout
        self._clock = clock
        self._fetch = fetch or self._fetch_https
        self._cache: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _fetch_https(self, domain: str) -> str:
        return await fetch_policy_text(domain, self._addresses, self._context, self._port, self._timeout)

    async def policy(self, domain: str) -> Policy | None:
        domain = domain.lower().rstrip(".")
        entry = self._cache.get(domain)
        now = self._clock()
        if entry is not None and now - entry.checked < RECHECK:
            return entry.policy if entry.policy is None or now < entry.expires else None
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:
            entry = self._cache.get(domain)
            if entry is not None and self._clock() - entry.checked < RECHECK:
                return entry.policy if entry.policy is None or self._clock() < entry.expires else None
            return await self._refresh(domain, entry)

    async def _refresh(self, domain: str, entry: _Entry | None) -> Policy | None:
        now = self._clock()
        cached = entry.policy if entry is not None and entry.policy is not None and now < entry.expires else None
        records = await self._txt(f"_mta-sts.{domain}")
        policy_id = parse_txt(records) if records is not None else None
        if policy_id is None:
            # No record (or a failed lookup): a cached policy stays in force until it expires (RFC 8461 5.1).
            self._cache[domain] = _Entry(cached, entry.expires if cached and entry else now, now)
            return cached
        if cached is not None and cached.policy_id == policy_id:
            self._cache[domain] = _Entry(cached, entry.expires if entry else now, now)
            return cached
        try:
            policy = parse_policy(await self._fetch(domain), policy_id)
        except PolicyError as exc:
            metrics.MTA_STS.labels(result="fetch_error").inc()
            log.warning("MTA-STS policy of %s (id %s) not usable: %s", domain, policy_id, exc)
            self._cache[domain] = _Entry(cached, entry.expires if cached and entry else now, now)
            return cached
        metrics.MTA_STS.labels(result="fetched").inc()
        log.info("MTA-STS policy of %s: mode=%s mx=%s max_age=%d id=%s", domain, policy.mode, ",".join(policy.mx),
                 policy.max_age, policy_id)
        active = policy if policy.mode != "none" else None
        self._cache[domain] = _Entry(active, now + policy.max_age, now)
        return active
