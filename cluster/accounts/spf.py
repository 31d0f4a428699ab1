"""SPF (RFC 7208) of a client's MAIL FROM identity (or of its HELO name for the null sender, RFC 7208 2.3).

Evaluation is pyspf's (the reference implementation; the OpenSPF RFC 7208 test suite runs against it in
tests/unit/test_spf_suite.py). pyspf is synchronous, so `SpfChecker.check` runs it in a small thread pool of its
own: its DNS lookups wait in those threads and never block the event loop. pyspf finds DNS through its module
attribute `spf.DNSLookup`; we point that once at `_dispatch`, which calls the lookup of the checker running in
the current thread (`_current.lookup`), so every checker passes its resolver explicitly and tests can answer
from zone data.

Inputs: client IP, MAIL FROM address ("" for the null sender), HELO name. Output: `SpfVerdict` with the result
("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"), pyspf's explanation, and the value
of the `Received-SPF` header (RFC 7208 9.1) for the message. Failure modes: a DNS timeout or SERVFAIL is the
result "temperror"; a broken record "permerror"; any other error inside pyspf is logged and gives "temperror"
(the client retries; never an unexplained accept of a "fail").
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf

from cluster.config import split_host_port

log = logging.getLogger(__name__)

# pyspf's lookup interface: (name, qtype, strict, timeout) -> [((name, type), data), ...]
Lookup = Callable[[str, str], list[tuple[tuple[str, str], Any]]]
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
SPF_THREADS = 8


class _Current(threading.local):
    lookup: Lookup | None = None


_current = _Current()


def _dispatch(name: str, qtype: str, strict: object = True, timeout: object = None, *_: object) -> Any:
    lookup = _current.lookup
    if lookup is None:
        raise spf.TempError("no SPF DNS lookup configured in this thread")
    return lookup(name, qtype)


spf.DNSLookup = _dispatch


class DnsLookup:
    """pyspf's lookups through dnspython's blocking resolver (run in the SPF threads only), on [dns] servers."""

    def __init__(self, nameservers: tuple[str, ...], timeout: float) -> None:
        if nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(*split_host_port(s, 53))
                                          for s in nameservers]
        else:
            try:
                self._resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                self._resolver = dns.resolver.Resolver(configure=False)
                self._resolver.nameservers = ["127.0.0.1"]
        self._resolver.lifetime = timeout

    def __call__(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        try:
            answer = self._resolver.resolve(name, qtype, raise_on_no_answer=False, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {exc}") from None
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS {exc}") from None
        found: list[tuple[tuple[str, str], Any]] = []
        for rrset in answer.response.answer:
            owner = rrset.name.to_text(omit_final_dot=True)
            kind = dns.rdatatype.to_text(rrset.rdtype)
            for rdata in rrset:
                if kind in ("A", "AAAA"):
                    found.append(((owner, kind), rdata.address))
                elif kind == "MX":
                    found.append(((owner, kind), (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))))
                elif kind in ("PTR", "CNAME"):
                    found.append(((owner, kind), rdata.target.to_text(omit_final_dot=True)))
                elif kind == "TXT":
                    found.append(((owner, kind), tuple(rdata.strings)))
        return found


@dataclass(frozen=True)
class SpfVerdict:
    result: str
    explanation: str
    # The Received-SPF header field's value (RFC 7208 9.1), without the name.
    header: str

    def header_field(self) -> bytes:
        """The whole header field, CRLF-terminated, to prepend to the message."""
        text = " ".join(self.header.replace("\r", " ").replace("\n", " ").split())
        return f"Received-SPF: {text}\r\n".encode("utf-8", "replace")


class SpfChecker:
    def __init__(self, lookup: Lookup, receiver: str, timeout: float, threads: int = SPF_THREADS,
                 default_explanation: str | None = None) -> None:
        self._lookup = lookup
        self._receiver = receiver
        self._timeout = timeout
        self._default_explanation = default_explanation
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="spf")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def check(self, client_ip: str, sender: str, helo: str) -> SpfVerdict:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.check_blocking, client_ip, sender, helo)

    def check_blocking(self, client_ip: str, sender: str, helo: str) -> SpfVerdict:
        _current.lookup = self._lookup
        try:
            query = spf.query(i=client_ip, s=sender, h=helo, receiver=self._receiver,
                              timeout=self._timeout, querytime=0)
            if self._default_explanation is not None:
                query.set_default_explanation(self._default_explanation)
            result, _, explanation = query.check()
            result = {"unknown": "permerror", "error": "temperror"}.get(result, result)
            header = query.get_header(result, receiver=self._receiver)
        except (spf.TempError, dns.exception.DNSException) as exc:
            return SpfVerdict("temperror", str(exc), f"temperror ({self._receiver}: {exc}) client-ip={client_ip};")
        except Exception as exc:  # pyspf raises assorted types on input it cannot handle: never crash a session
            log.exception("SPF check of %s from %s failed", sender or helo, client_ip)
            return SpfVerdict("temperror", repr(exc), f"temperror ({self._receiver}: internal error) "
                              f"client-ip={client_ip};")
        finally:
            _current.lookup = None
        if result not in RESULTS:
            result = "temperror"
        return SpfVerdict(result, str(explanation), str(header))
