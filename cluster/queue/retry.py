"""The retry schedule (pure): when a deferred recipient is tried again, and when it gives up.

RFC 5321 4.5.4.1: retry intervals of at least 30 minutes are recommended, give-up time at least 4-5 days.
Like Postfix, the first retry comes after `queue.retry_first`, each next one doubles, capped at
`queue.retry_max`; a jitter of +-10 % spreads retries of mail deferred at the same moment. After
`queue.max_lifetime` since the message arrived, the recipient fails with 4.4.7 (RFC 3463: delivery time expired).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cluster.config import QueueConfig

JITTER = 0.1
EXPIRED_STATUS = "4.4.7"


@dataclass(frozen=True)
class RetryDecision:
    give_up: bool
    next_attempt: float


class RetrySchedule:
    def __init__(self, config: QueueConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or random.Random()

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1 = the first)."""
        exponent = max(attempts - 1, 0)
        base = self._config.retry_first * (2.0 ** min(exponent, 60))
        base = min(base, self._config.retry_max)
        return base * (1.0 + self._rng.uniform(-JITTER, JITTER))

    def after_deferral(self, attempts: int, arrival: float, now: float) -> RetryDecision:
        """What to do with a recipient deferred for the `attempts`-th time, for a message arrived at `arrival`."""
        if now - arrival >= self._config.max_lifetime:
            return RetryDecision(True, 0.0)
        next_attempt = now + self.delay(attempts)
        # Do not wait past the give-up time only to expire then: one last try near the deadline.
        return RetryDecision(False, min(next_attempt, max(arrival + self._config.max_lifetime, now)))
