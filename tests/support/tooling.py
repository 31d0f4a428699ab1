"""Helpers for tests that need system tools (smtp-sink, dnsmasq, swaks, promtool...).

A missing tool skips the test on a laptop but fails it in CI (CI=true): a skipped test proves nothing.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """Path of a system tool; skip (locally) or fail (in CI) when it is not installed."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/usr/local/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        message = f"{name} is not installed (install it as .ci/run does)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


_next_port: int | None = None


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on `host` a moment ago, outside the kernel's range for outgoing connections.

    A port the OS hands out for bind(0) comes from that range, so while a test runs (a cluster under load opens
    thousands of connections) an outgoing connection of any process may take it before the server that was to
    listen on it starts, or restarts after a kill -9 ("address already in use"). Ports outside the range are
    only ever taken by someone binding them on purpose."""
    global _next_port
    low, high = _listening_range()
    for _ in range(50):
        port = 0
        if high > low:  # the next port of the range, from a random start: no port is handed out twice in a run
            _next_port = random.randrange(low, high) if _next_port is None else _next_port + 1
            if not low <= _next_port < high:
                _next_port = low
            port = _next_port
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            bound: int = s.getsockname()[1]
            return bound
    raise OSError(f"no free port on {host} in {low}-{high}")


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
