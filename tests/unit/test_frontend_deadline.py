"""The session's lazily re-armed read timer (cluster/frontend/deadline.py)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.frontend.deadline import ReadDeadline


async def _read_under(deadline: ReadDeadline, seconds: float, wait: asyncio.Future[None]) -> str:
    """What a session does around one read: "data", "timeout", or the CancelledError of someone else."""
    deadline.arm(seconds)
    try:
        await wait
    except asyncio.CancelledError:
        if not deadline.expired():
            raise
        return "timeout"
    finally:
        deadline.disarm()
    return "data"


async def _session(reads: list[tuple[float, float]]) -> list[str]:
    """Reads in turn: (timeout, seconds until the data comes)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    deadline = ReadDeadline(task)
    outcomes = []
    try:
        for timeout, arrives in reads:
            wait: asyncio.Future[None] = loop.create_future()
            loop.call_later(arrives, lambda w=wait: w.done() or w.set_result(None))
            outcomes.append(await _read_under(deadline, timeout, wait))
    finally:
        deadline.close()
    return outcomes


async def test_a_read_slower_than_its_timeout_times_out_and_the_session_goes_on() -> None:
    assert await _session([(0.05, 0.01), (0.05, 1.0), (5.0, 0.01)]) == ["data", "timeout", "data"]
    assert asyncio.current_task() is not None and asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_later_deadline_does_not_cut_a_read_short() -> None:
    # The timer armed for the first read (0.1 s) fires during the second; it must re-arm, not cancel.
    assert await _session([(0.1, 0.0), (0.4, 0.25)]) == ["data", "data"]


async def test_an_earlier_deadline_moves_the_timer_forward() -> None:
    # The first read arms the timer 30 s out; the second (data timeout, shorter) must not wait for it.
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(_session([(30.0, 0.0), (0.05, 10.0)]), 5) == ["data", "timeout"]
    assert asyncio.get_running_loop().time() - started < 2


async def test_a_cancellation_from_elsewhere_is_not_a_timeout() -> None:
    task = asyncio.create_task(_session([(30.0, 30.0)]))
    await asyncio.sleep(0)  # the session runs up to its read
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_no_timer_is_left_behind_when_the_session_ends() -> None:
    # A timer left armed would keep the ended session (its task, buffers) alive until it fired.
    task = asyncio.current_task()
    assert task is not None
    deadline = ReadDeadline(task)
    deadline.arm(30.0)
    deadline.disarm()
    timer = deadline._timer
    assert timer is not None and not timer.cancelled()
    deadline.close()
    assert timer.cancelled() and deadline._timer is None
