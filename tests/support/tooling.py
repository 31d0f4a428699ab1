"""Helpers for tests that need system tools (smtp-sink, dnsmasq, swaks, promtool...) or optional Python modules.

A missing tool or module skips the test on a laptop but fails it in CI (CI=true): a skipped test proves nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import shutil
import socket
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """Path of a system tool; skip (locally) or fail (in CI) when it is not installed."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/usr/local/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        skip_or_fail(f"{name} is not installed (install it as .ci/run does)")
    return path


def require_module(name: str) -> ModuleType:
    """A Python module of the test requirements (pyproject.toml), imported; skip (locally) or fail (in CI) when it
    cannot be imported. Usable at a module's top level too."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"the Python module {name} cannot be imported ({exc}); make installs it")


def require_root(why: str) -> None:
    """Skip (locally) or fail (in CI) unless the tests run as root; `why` says what needs it."""
    if os.geteuid() != 0:
        skip_or_fail(why)


def skip_or_fail(message: str) -> NoReturn:
    """A test that cannot run here: skipped on a laptop, failed in CI (CI=true), where a skip would prove nothing."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)  # a module's top level may ask too (`require_module`)


_next_port: int | None = None


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on `host` a moment ago, outside the kernel's range for outgoing connections.

    A port the OS hands out for bind(0) comes from that range, so while a test runs (a cluster under load opens
    thousands of connections) an outgoing connection of any process may take it before the server that was to
    listen on it starts, or restarts after a kill -9 ("address already in use"). Ports outside the range are
    only ever taken by someone binding them on purpose."""
    return free_ports_in_a_row(1, host, kind)


def free_ports_in_a_row(count: int, host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """The first of `count` consecutive ports that were all free a moment ago (`mtacluster up` gives its child N
    the metrics port base + N). Ports are handed out in order from a random start, so no port of this run's
    `free_port` or `free_ports_in_a_row` is handed out twice."""
    global _next_port
    low, high = _listening_range()
    for _ in range(50):
        base = 0
        if high > low:
            base = random.randrange(low, high) if _next_port is None else _next_port
            if not low <= base <= high - count:
                base = low
            _next_port = base + count
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count) if base else [0]:
                    s = held.enter_context(socket.socket(socket.AF_INET, kind))
                    s.bind((host, port))
                    if not base:
                        bound: int = s.getsockname()[1]
                        return bound
            except OSError:
                continue
            return base
    raise OSError(f"no {count} free ports in a row on {host} in {low}-{high}")


def _listening_range() -> tuple[int, int]:
    """Ports for test servers: below the ephemeral range (net.ipv4.ip_local_port_range), else above it, else
    (0, 0) (no room: let the OS pick)."""
    try:
        low, high = (int(field) for field in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 10000 >= 2000:
        return 10000, low
    if 65535 - high >= 2000:
        return high + 1, 65536
    return 0, 0
