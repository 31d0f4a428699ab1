"""The periodic work of one shard, one `tick(now)` at a time (the shard calls it every TIMER_INTERVAL).

Each tick: deferred recipients whose time has come become ready, jobs of silent workers and expired leases
are taken back (workers.py), destination backoffs that are over end, destinations held back by traffic shaping
are looked at again when their wait is over, and the gauges are refreshed; every
DISK_CHECK_INTERVAL seconds the spool's free space is measured and delay warnings that are due are made, and
after the queue drained to a quarter of its peak (scheduler.py) freed memory goes back to the system.
Inputs: the time (`now`, wall clock, for queue times) and a monotonic time (for the disk check interval).
Outputs: True when something may have become dispatchable (the caller wakes the dispatcher). No failure
modes of its own: errors of the parts it drives are handled there.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from cluster.queue import metrics
from cluster.queue.bounces import BounceMaker
from cluster.queue.inject import DiskSpace
from cluster.queue.records import State
from cluster.queue.scheduler import Scheduler
from cluster.queue.workers import WorkerRegistry

TIMER_INTERVAL = 0.1
DISK_CHECK_INTERVAL = 1.0


class Maintainer:
    def __init__(self, label: str, scheduler: Scheduler, workers: WorkerRegistry, bounces: BounceMaker,
                 space: DiskSpace) -> None:
        self.label = label
        self.scheduler = scheduler
        self.workers = workers
        self.bounces = bounces
        self.space = space
        self._last_disk_check = float("-inf")

    def tick(self, now: float, monotonic: float, expire: bool = True) -> bool:
        wake = self.scheduler.promote_due(now) > 0
        if expire:  # only once every frame waiting on the socket was read (shard.py)
            wake = self.workers.expire(now) > 0 or wake
        wake = self.scheduler.end_backoffs(now) or wake
        # Traffic shaping: a rate-limited or suspended destination may start again (shaping.py).
        wake = (self.scheduler.shaper is not None and self.scheduler.shaper.due(now)) or wake
        if monotonic - self._last_disk_check >= DISK_CHECK_INTERVAL:
            self._last_disk_check = monotonic
            if self.scheduler.shrunk:  # the queue drained to a quarter of its peak: give the memory back
                self.scheduler.shrunk = False
                give_back_memory()
            self.space.refresh()
            self.bounces.check_delays(now)
        self.refresh_gauges(now)
        return wake

    def refresh_gauges(self, now: float) -> None:
        scheduler = self.scheduler
        for state in metrics.GAUGE_STATES:
            metrics.MESSAGES.labels(self.label, state).set(scheduler.message_counts[State(state)])
            metrics.RECIPIENTS.labels(self.label, state).set(scheduler.recipient_counts[State(state)])
        metrics.WORKERS.labels(self.label).set(len(scheduler.workers))
        metrics.HELD_OFF_DESTINATIONS.labels(self.label).set(len(scheduler.backoff_until))
        metrics.HELD_OFF_MESSAGES.labels(self.label).set(scheduler.held_off_messages() if scheduler.backoff_until
                                                         else 0)
        oldest = next(iter(scheduler.messages.values()), None)
        metrics.OLDEST_AGE.labels(self.label).set(max(0.0, now - oldest.arrival) if oldest else 0.0)


def give_back_memory() -> None:
    """Return freed heap memory to the operating system (glibc keeps it otherwise); a no-op elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
