"""Which queue shard owns a domain: rendezvous (highest random weight) hashing over the shard list.

ARCHITECTURE.md contract 3: all state about one destination lives in one shard. The key is the recipient domain,
normalised by `cluster.domains.domain_key` (lower-cased, IDNA-encoded), so "Example.COM", "example.com" and
"bücher.de" / "xn--bcher-kva.de" each map to exactly one shard. Rendezvous hashing moves only about 1/N of
the domains when a shard is added.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

# Re-exported for the modules that import it from here; new code imports it from cluster.domains.
from cluster.domains import domain_key as domain_key


def _weight(shard: str, key: str) -> int:
    digest = hashlib.blake2b(f"{shard}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=65536)
def _owner(key: str, shard_count: int) -> int:
    # Weight by shard number, not endpoint text, so renaming an endpoint (pod IP change) moves nothing.
    return max(range(shard_count), key=lambda index: _weight(str(index), key))


def owner_index(key: str, count: int) -> int:
    """The owner of an already normalised `key` among `count` members (shards, mailbox nodes): the same ring
    for every kind of owned state (ARCHITECTURE.md contract 7)."""
    if count < 1:
        raise ValueError("no owners configured")
    return _owner(key, count)


def shard_for_domain(domain: str, shards: Sequence[str]) -> int:
    """Index of the shard (in `shards`, the configured endpoint list) that owns `domain`."""
    if not shards:
        raise ValueError("no shards configured")
    return _owner(domain_key(domain), len(shards))


def shard_for_address(address: str, shards: Sequence[str]) -> int:
    """Shard owning the domain of a mailbox address; the null sender and bare local parts go to shard 0."""
    _, at, domain = address.rpartition("@")
    if not at or not domain:
        return 0
    return shard_for_domain(domain, shards)


def shard_for_key(key: str, shards: Sequence[str]) -> int:
    """Shard owning another piece of state named by `key` (ARCHITECTURE.md contract 7): a user's sending counters
    (key: the user name) or a client address's failed-AUTH count (key: the address). Case does not matter."""
    if not shards:
        raise ValueError("no shards configured")
    return _owner(key.strip().lower(), len(shards))
