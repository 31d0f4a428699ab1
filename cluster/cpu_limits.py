"""The CPUs this process may use: its affinity mask, capped by the CPU quota of its control groups.

Inputs: `os.sched_getaffinity` (a container's cpuset) and, on Linux, `/proc/self/cgroup` with the cgroup file
system under `/sys/fs/cgroup` (v2 `cpu.max`; v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), read at each call.
Outputs: `usable_cpus()` (at least 1) and `cpu_quota()` (CPUs' worth of time, or None for no limit).
Failure modes: none raised; an unreadable or malformed cgroup file counts as no limit there, and a system
without affinity masks falls back to `os.cpu_count()`. `mtacluster up` scales its defaults with it
(`cluster.config.up_processes`).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

# Where `cpu_quota` reads the CPU limits of this process's control groups (Linux; read at each call).
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (a container's cpuset), and no more than its CPU quota allows
    (a container's `--cpus`, a Kubernetes CPU limit: `cpu_quota`, rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cpu_quota() -> float | None:
    """The CPUs' worth of time the control groups of this process allow (cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`; the smallest on the way up to the root), or None: no limit, or
    nothing readable (not Linux, no cgroup file system)."""
    try:
        memberships = CGROUP_MEMBERSHIP.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for membership in memberships:
        _, controllers, path = [*membership.split(":", 2), "", ""][:3]
        if controllers == "":  # cgroup v2, at the root or beside the v1 hierarchies
            base = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified"
        elif "cpu" in controllers.split(","):
            base = CGROUP_ROOT / controllers
        else:
            continue
        directory = base / path.strip("/")
        while True:
            with contextlib.suppress(OSError, ValueError, ZeroDivisionError):
                if controllers == "":
                    quota, period = (directory / "cpu.max").read_text().split()
                    if quota != "max":
                        limits.append(int(quota) / int(period))
                else:
                    quota_us = int((directory / "cpu.cfs_quota_us").read_text())
                    if quota_us > 0:
                        limits.append(quota_us / int((directory / "cpu.cfs_period_us").read_text()))
            if directory == base or directory.parent == directory:
                break
            directory = directory.parent
    return min(limits) if limits else None
