"""The test support's port picker: ports outside the kernel's range for outgoing connections, never the same twice."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from tests.support.tooling import free_port, free_ports_in_a_row


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
