"""The exact retry decisions (cluster/queue/retry.py): giving up carries no next attempt, going on says so."""

from __future__ import annotations

import random

from cluster.config import Duration, QueueConfig
from cluster.queue.retry import RetryDecision, RetrySchedule

CONFIG = QueueConfig(retry_first=Duration(300), retry_max=Duration(4000), max_lifetime=Duration(5 * 86400))


def test_giving_up_and_going_on_are_exact_decisions() -> None:
    schedule = RetrySchedule(CONFIG, random.Random(1))
    arrival = 1_000_000.0
    assert schedule.after_deferral(3, arrival, now=arrival + 5 * 86400) == RetryDecision(True, 0.0)
    going_on = schedule.after_deferral(1, arrival, now=arrival + 60)
    assert going_on.give_up is False and going_on.next_attempt > arrival + 60
