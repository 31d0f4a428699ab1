"""Helpers for tests that need system tools (smtp-sink, dnsmasq, swaks, promtool...).

A missing tool skips the test on a laptop but fails it in CI (CI=true): a skipped test proves nothing.
"""

from __future__ import annotations

import os
import shutil
import socket

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


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
