"""The test support: the port picker (ports outside the kernel's range for outgoing connections, never the same
twice) and the guard of tests that cannot run here (skipped on a laptop, failed in CI)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest

from tests.support.tooling import free_port, free_ports_in_a_row, require_module, require_root, require_tool


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    low, high = (int(field) for field in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= port <= high for port in ports), [p for p in ports if low <= p <= high][:5]
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # still free


def test_a_run_of_ports_is_free_and_no_later_free_port_falls_inside_it() -> None:
    base = free_ports_in_a_row(6)
    later = {free_port() for _ in range(50)}
    assert not later & set(range(base, base + 6))
    with contextlib.ExitStack() as held:
        for port in range(base, base + 6):
            held.enter_context(socket.socket()).bind(("127.0.0.1", port))


def test_a_test_that_cannot_run_here_fails_in_ci_and_is_skipped_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        require_root("this needs root")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require_tool("no-such-tool-anywhere")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_anywhere cannot be imported"):
        require_module("no_such_module_anywhere")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        require_root("this needs root")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_anywhere cannot be imported"):
        require_module("no_such_module_anywhere")
    assert require_module("json").dumps([]) == "[]"  # there: imported
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    require_root("this needs root")  # root: runs
