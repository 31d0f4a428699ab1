"""Resident memory of the cluster's processes while the benchmark runs, per role.

`RssSampler(pids)` (pid -> role, from `ClusterInstance.role_pids()`) reads `VmRSS` from /proc/PID/status of
every process every `interval` seconds between `start()` and `stop()`; `stop()` also reads each process's
`VmHWM` (the kernel's own peak RSS since the process started, which catches a spike between two samples) and
returns a `RolePeaks`: per role, the largest sampled RSS of any of its processes and the largest VmHWM, in MiB.
`parse_status_kib(text, field)` is the pure parser of one /proc/PID/status field.

Failure modes: a process that exited (or whose status cannot be read) is skipped for that sample; a role none
of whose processes could be read is absent from the result.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_INTERVAL = 0.2
KIB_PER_MIB = 1024.0


def parse_status_kib(text: str, name: str) -> int | None:
    """The value in kB of field `name` ("VmRSS", "VmHWM") in the text of /proc/PID/status, or None."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            parts = value.split()
            if parts and parts[0].isdigit():
                return int(parts[0])
    return None


def read_status_kib(pid: int, name: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return parse_status_kib(text, name)


@dataclass
class RolePeaks:
    """Per role, MiB: the largest RSS sampled while the load ran, and the largest kernel high-water mark."""

    sampled_mib: dict[str, float] = field(default_factory=dict)
    hwm_mib: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def note(self, into: dict[str, float], role: str, kib: int) -> None:
        into[role] = max(into.get(role, 0.0), kib / KIB_PER_MIB)

    def peak_mib(self) -> dict[str, float]:
        """Per role, the larger of the sampled peak and the high-water mark."""
        roles = sorted(set(self.sampled_mib) | set(self.hwm_mib))
        return {role: max(self.sampled_mib.get(role, 0.0), self.hwm_mib.get(role, 0.0)) for role in roles}


class RssSampler:
    def __init__(self, pids: dict[int, str], interval: float = DEFAULT_INTERVAL) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.peaks = RolePeaks()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        for pid, role in self.pids.items():
            kib = read_status_kib(pid, "VmRSS")
            if kib is not None:
                self.peaks.note(self.peaks.sampled_mib, role, kib)
        self.peaks.samples += 1

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)  # the sampling period, not a synchronisation

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> RolePeaks:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self.sample()
        for pid, role in self.pids.items():
            kib = read_status_kib(pid, "VmHWM")
            if kib is not None:
                self.peaks.note(self.peaks.hwm_mib, role, kib)
        return self.peaks
