"""Egress sources: which local address (and EHLO name) a delivery leaves from.

Input: `[egress]` of the configuration and a Deliver's `source` and `pool` names. The shard that owns the
destination chooses the source (traffic shaping counts per (source, destination): cluster/queue/shaping.py),
so `EgressChooser.for_job(source, pool)` returns that source. A Deliver without one (from a shard of the
previous release) falls back to `choose(pool)`: a pool's sources picked at random in proportion to their
weights. No source and no pool ("") or no `[egress]` at all: `DEFAULT_SOURCE`, the kernel's choice of address
and the configured `delivery.helo_name`.
Failure modes: a source or pool name this worker does not know (its configuration differs from the shard's or
the frontend's) is logged once; the job then uses the pool, else the "default" pool if there is one, else the
kernel's address: the mail goes out rather than waiting for a configuration fix.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from cluster.config import EgressConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    name: str  # "" for the default source (no binding)
    address: str  # local address to bind, "" = any
    helo_name: str  # "" = the worker's default EHLO name


DEFAULT_SOURCE = Source("", "", "")


class EgressChooser:
    def __init__(self, egress: EgressConfig, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._pools: dict[str, tuple[list[Source], list[int]]] = {}
        for pool, members in egress.pools.items():
            sources = [Source(m.source, egress.sources[m.source].address, egress.sources[m.source].helo_name)
                       for m in members]
            self._pools[pool] = (sources, [m.weight for m in members])
        self._sources = {name: Source(name, src.address, src.helo_name) for name, src in egress.sources.items()}
        self._unknown_logged: set[str] = set()

    def for_job(self, source: str, pool: str) -> Source:
        """The source the shard chose for a job, or (none, or unknown here) one chosen from its pool."""
        found = self._sources.get(source) if source else None
        if found is not None:
            return found
        if source and f"source {source}" not in self._unknown_logged:
            self._unknown_logged.add(f"source {source}")
            log.warning("egress source %r is not configured on this worker; choosing from pool %r", source, pool)
        return self.choose(pool)

    def choose(self, pool: str) -> Source:
        entry = self._pools.get(pool) if pool else None
        if entry is None and pool:
            if f"pool {pool}" not in self._unknown_logged:
                self._unknown_logged.add(f"pool {pool}")
                log.warning("egress pool %r is not configured on this worker; using the default pool", pool)
            entry = self._pools.get("default")
        if entry is None:
            return DEFAULT_SOURCE
        sources, weights = entry
        return sources[0] if len(sources) == 1 else self._rng.choices(sources, weights)[0]
