"""Idle SMTP connections kept for reuse, per egress source and destination (source name, address, port).

`take(target)` hands out an idle session to that destination (most recently used first) or None;
`give_back(session)` keeps a session that finished a transaction cleanly, unless it has done
`max_deliveries` transactions or is no longer usable, in which case it is closed with QUIT. Sessions idle
longer than `idle_timeout` are closed by `prune()` (the worker calls it periodically) and are never handed
out. A session handed out may still turn out dead (the server timed it out); the caller reconnects once
(see `HostUnavailable.stale`). Counts hits and misses in mtacluster_delivery_connection_cache_total.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.delivery import metrics
from cluster.delivery.mx import Target
from cluster.delivery.session import SmtpSession

Key = tuple[str, str, int]


class ConnectionCache:
    def __init__(self, idle_timeout: float, max_deliveries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._idle_timeout = idle_timeout
        self._max_deliveries = max_deliveries
        self._clock = clock
        self._idle: dict[Key, list[tuple[float, SmtpSession]]] = {}

    @staticmethod
    def key(target: Target, source: str = "") -> Key:
        return source, target.address, target.port

    def take(self, target: Target, source: str = "") -> SmtpSession | None:
        sessions = self._idle.get(self.key(target, source))
        now = self._clock()
        while sessions:
            since, session = sessions.pop()
            if now - since < self._idle_timeout and session.usable:
                metrics.count(metrics.CACHE_HIT)
                return session
            session.close(polite=True)
        metrics.count(metrics.CACHE_MISS)
        return None

    def give_back(self, session: SmtpSession) -> None:
        limit = min(self._max_deliveries, getattr(session, "transaction_limit", 0) or self._max_deliveries)
        if self._idle_timeout <= 0 or session.transactions >= limit or not session.usable:
            session.close(polite=True)
            return
        self._idle.setdefault(self.key(session.target, session.source.name), []).append((self._clock(), session))

    def prune(self) -> int:
        """Close sessions idle too long or closed by the server; return how many are still kept."""
        now = self._clock()
        kept = 0
        for key in list(self._idle):
            alive = []
            for since, session in self._idle[key]:
                if now - since < self._idle_timeout and session.usable:
                    alive.append((since, session))
                else:
                    session.close(polite=True)
            if alive:
                self._idle[key] = alive
                kept += len(alive)
            else:
                del self._idle[key]
        return kept

    def close_all(self) -> None:
        for sessions in self._idle.values():
            for _, session in sessions:
                session.close(polite=True)
        self._idle.clear()

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self._idle.values())
