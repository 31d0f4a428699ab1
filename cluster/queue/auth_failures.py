"""Failed SMTP AUTH per client address, cluster-wide: the count kept by the shard that owns the address on the
ring (ARCHITECTURE.md contract 7), as Postfix's anvil counts per host. Pure; time is passed in.

`record(client, failed, window, limit, now)` adds `failed` failures (0: only ask) and returns
(failures within the window, seconds until AUTH is allowed again: 0 when not blocked). A client is blocked once
it has `limit` failures within `window`, until the oldest of the failures that block it leaves the window.
Kept in memory only (a restarted shard forgets, as anvil does); at most `max_clients` addresses are tracked,
the least recently seen are dropped first, so a flood of addresses cannot grow it without bound.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class AuthFailureCounter:
    def __init__(self, max_clients: int = 100_000) -> None:
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def record(self, client: str, failed: int, window: float, limit: int, now: float) -> tuple[int, float]:
        times = self._failures.get(client)
        if times is None:
            if not failed:
                return 0, 0.0
            times = self._failures[client] = deque()
        self._failures.move_to_end(client)
        while times and times[0] <= now - window:
            times.popleft()
        times.extend([now] * failed)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        count = len(times)
        if not times:
            del self._failures[client]
            return 0, 0.0
        if limit <= 0 or count < limit:
            return count, 0.0
        # Blocked until enough failures leave the window that fewer than `limit` remain.
        release_at = times[count - limit] + window
        return count, max(0.0, release_at - now)
