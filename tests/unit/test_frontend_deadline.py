"""The frontend's read timeouts, kept by one sweep for every session (cluster/frontend/deadline.py)."""

from __future__ import annotations

import asyncio

from cluster.frontend.deadline import Deadlines


class Item:
    def __init__(self) -> None:
        self.deadline: float | None = None
        self.fired: list[float] = []

    def expired(self) -> None:
        self.fired.append(asyncio.get_running_loop().time())


async def _until(condition: object, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not condition() and loop.time() < end:  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def test_a_passed_deadline_fires_once_within_the_interval_and_a_later_one_waits() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(0.02)
    late, early, idle = Item(), Item(), Item()
    for item in (late, early, idle):
        deadlines.watch(item)
    early.deadline = loop.time() + 0.05
    late.deadline = loop.time() + 5.0
    await _until(lambda: early.fired, 2.0)
    assert len(early.fired) == 1 and early.deadline is None
    await asyncio.sleep(0.1)
    assert len(early.fired) == 1  # not again: the deadline was cleared when it fired
    assert late.fired == [] and idle.fired == []
    deadlines.close()


async def test_a_deadline_moved_on_before_it_passed_does_not_fire_and_a_forgotten_item_never_fires() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(0.02)
    moved, forgotten = Item(), Item()
    deadlines.watch(moved)
    deadlines.watch(forgotten)
    moved.deadline = loop.time() + 0.05
    forgotten.deadline = loop.time() + 0.05
    deadlines.forget(forgotten)
    await asyncio.sleep(0.03)
    moved.deadline = loop.time() + 0.3  # the session heard from its client and waits again
    await asyncio.sleep(0.1)
    assert moved.fired == [] and forgotten.fired == []
    await _until(lambda: moved.fired, 2.0)
    assert len(moved.fired) == 1
    deadlines.close()


async def test_the_sweep_stops_when_nothing_is_watched_and_restarts_with_the_next_item() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(0.02)
    first = Item()
    deadlines.watch(first)
    deadlines.forget(first)
    await asyncio.sleep(0.05)
    assert deadlines._timer is None  # the sweep saw nothing to watch and did not re-arm
    second = Item()
    second.deadline = loop.time()
    deadlines.watch(second)
    await _until(lambda: second.fired, 2.0)
    assert len(second.fired) == 1
    deadlines.close()
