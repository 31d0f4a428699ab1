"""Egress sources: which local address (and EHLO name) a delivery leaves from, by the message's pool.

Input: `[egress]` of the configuration and a Deliver's `pool` name. `EgressChooser.choose(pool)` returns the
`Source` to use: a pool's sources are picked at random in proportion to their weights (so connections spread
over the pool's addresses as configured). No pool ("") or no `[egress]` at all: `Source.DEFAULT`, the kernel's
choice of address and the configured `delivery.helo_name`.
Failure modes: a pool name this worker does not know (its configuration differs from the frontend's) is
logged once and delivered through the "default" pool if there is one, else from the kernel's address: the mail
goes out rather than waiting for a configuration fix.
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
        self._unknown_logged: set[str] = set()

    def choose(self, pool: str) -> Source:
        entry = self._pools.get(pool) if pool else None
        if entry is None and pool:
            if pool not in self._unknown_logged:
                self._unknown_logged.add(pool)
                log.warning("egress pool %r is not configured on this worker; using the default pool", pool)
            entry = self._pools.get("default")
        if entry is None:
            return DEFAULT_SOURCE
        sources, weights = entry
        return sources[0] if len(sources) == 1 else self._rng.choices(sources, weights)[0]
