"""Domain names as the cluster compares them: one normalisation for routing, queueing, sharding and metrics.

Input: a domain as a client, a DNS answer or an operator wrote it ("Example.COM.", "bücher.de", "[192.0.2.1]").
Output: the key `domain_key` returns: trimmed, lower-case, no trailing root dot, IDNA A-label form for
internationalised names (so "bücher.de" and "xn--bcher-kva.de" are one destination), address literals only
lower-cased. ARCHITECTURE.md contract 3 shards by this key, so every role must use this function and no other.
Failure modes: none raised; a name that is not valid IDNA keeps its lower-case Unicode form, which is still a
stable key.
"""

from __future__ import annotations


def domain_key(domain: str) -> str:
    """Normalise a domain for hashing, queueing, routing and comparing: lower-case, IDNA, no trailing dot."""
    domain = domain.strip().rstrip(".").lower()
    if domain.startswith("[") or domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        # Not valid IDNA2003 (the stdlib codec): keep the Unicode form so the key is still stable.
        return domain
