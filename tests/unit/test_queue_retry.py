"""The retry schedule with a virtual clock and a seeded RNG."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from cluster.config import Duration, QueueConfig
from cluster.queue.retry import JITTER, RetrySchedule

CONFIG = QueueConfig(retry_first=Duration(300), retry_max=Duration(4000), max_lifetime=Duration(5 * 86400))


def test_first_retry_doubles_and_caps() -> None:
    schedule = RetrySchedule(CONFIG, random.Random(7))
    delays = [schedule.delay(n) for n in range(1, 8)]
    bases = [300, 600, 1200, 2400, 4000, 4000, 4000]
    for delay, base in zip(delays, bases, strict=True):
        assert base * (1 - JITTER) <= delay <= base * (1 + JITTER)


def test_jitter_is_deterministic_under_a_seed() -> None:
    first = [RetrySchedule(CONFIG, random.Random(42)).delay(3) for _ in range(2)]
    assert first[0] == first[1]
    assert RetrySchedule(CONFIG, random.Random(43)).delay(3) != first[0]


def test_gives_up_after_max_lifetime() -> None:
    schedule = RetrySchedule(CONFIG, random.Random(1))
    arrival = 1_000_000.0
    decision = schedule.after_deferral(1, arrival, now=arrival + 60)
    assert not decision.give_up and arrival + 60 + 270 <= decision.next_attempt <= arrival + 60 + 330
    assert schedule.after_deferral(40, arrival, now=arrival + 5 * 86400).give_up
    near_end = schedule.after_deferral(40, arrival, now=arrival + 5 * 86400 - 100)
    assert not near_end.give_up and near_end.next_attempt == arrival + 5 * 86400  # one last try at the deadline


def test_a_whole_life_of_retries_on_a_virtual_clock() -> None:
    schedule = RetrySchedule(CONFIG, random.Random(3))
    arrival = now = 0.0
    attempts = 0
    while True:
        attempts += 1
        decision = schedule.after_deferral(attempts, arrival, now)
        if decision.give_up:
            break
        assert decision.next_attempt > now
        now = decision.next_attempt
    assert now == 5 * 86400
    assert 100 < attempts < 130  # about 5 days / 4000 s, plus the first doublings


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=2**32))
def test_delay_is_always_within_bounds(attempts: int, seed: int) -> None:
    delay = RetrySchedule(CONFIG, random.Random(seed)).delay(attempts)
    assert CONFIG.retry_first * (1 - JITTER) <= delay <= CONFIG.retry_max * (1 + JITTER)
