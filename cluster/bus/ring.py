"""Which queue shard owns a domain: rendezvous (highest random weight) hashing over the shard list.

ARCHITECTURE.md contract 3: all state about one destination lives in one shard. The key is the recipient domain,
normalised by `cluster.domains.domain_key` (lower-cased, IDNA-encoded), so "Example.COM", "example.com" and
"bücher.de" / "xn--bcher-kva.de" each map to exactly one shard. Rendezvous hashing moves only about 1/N of
the domains when a shard is added.

Drained shards (issue 14): `excluded` names shard indices that take no new mail (draining or drained). The
owner is then the highest-weight shard among the others, so only the domains of the excluded shards move, and
every other index keeps its meaning (the weights are by shard number, never by position in a shortened list).
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
def _owner(key: str, shard_count: int, excluded: frozenset[int] = frozenset()) -> int:
    # Weight by shard number, not endpoint text, so renaming an endpoint (pod IP change) moves nothing.
    members = [index for index in range(shard_count) if index not in excluded] or list(range(shard_count))
    return max(members, key=lambda index: _weight(str(index), key))


def owner_index(key: str, count: int, excluded: frozenset[int] = frozenset()) -> int:
    """The owner of an already normalised `key` among `count` members (shards, mailbox nodes) less `excluded`:
    the same ring for every kind of owned state (ARCHITECTURE.md contract 7). When every member is excluded,
    the exclusion is ignored (mail must go somewhere)."""
    if count < 1:
        raise ValueError("no owners configured")
    return _owner(key, count, excluded)


def shard_for_domain(domain: str, shards: Sequence[str], excluded: frozenset[int] = frozenset()) -> int:
    """Index of the shard (in `shards`, the configured endpoint list) that owns `domain`, skipping `excluded`."""
    if not shards:
        raise ValueError("no shards configured")
    return _owner(domain_key(domain), len(shards), excluded)


def shard_for_address(address: str, shards: Sequence[str], excluded: frozenset[int] = frozenset()) -> int:
    """Shard owning the domain of a mailbox address; the null sender and bare local parts go to the first
    shard not excluded (shard 0 when none is)."""
    _, at, domain = address.rpartition("@")
    if not at or not domain:
        return next((i for i in range(len(shards)) if i not in excluded), 0)
    return shard_for_domain(domain, shards, excluded)


def shard_for_key(key: str, shards: Sequence[str], excluded: frozenset[int] = frozenset()) -> int:
    """Shard owning another piece of state named by `key` (ARCHITECTURE.md contract 7): a user's sending counters
    (key: the user name) or a client address's failed-AUTH count (key: the address), skipping `excluded` like
    `shard_for_domain` (a draining shard's counters move to this owner). Case does not matter."""
    if not shards:
        raise ValueError("no shards configured")
    return _owner(key.strip().lower(), len(shards), excluded)
