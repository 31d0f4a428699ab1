"""Loopback ports for the benchmark's listeners, chosen free at start.

`free_ports(n)` holds n sockets bound to port 0 at once, so the n ports differ; `free_ports_and_block(n, k)`
also finds k consecutive free ports (the cluster's supervisor gives child i the metrics port base + i), distinct
from the n others. A port found free
can still be taken by another program before the benchmark binds it: the caller then fails with a clear
"address in use" error from the listener, never silently.
"""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack

HOST = "127.0.0.1"
_BLOCK_RANGE = (20000, 60000)
_BLOCK_ATTEMPTS = 200


def _bind(stack: ExitStack, host: str, port: int) -> int:
    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.bind((host, port))
    return int(sock.getsockname()[1])


def free_ports(count: int, host: str = HOST) -> list[int]:
    with ExitStack() as stack:
        return [_bind(stack, host, 0) for _ in range(count)]


def _hold_block(stack: ExitStack, host: str, base: int, count: int) -> bool:
    """Bind base..base+count-1 on `stack` (held until it closes); False when one of them is taken."""
    attempt = ExitStack()
    try:
        for offset in range(count):
            _bind(attempt, host, base + offset)
    except OSError:
        attempt.close()
        return False
    stack.enter_context(attempt)
    return True


def free_ports_and_block(count: int, block: int, host: str = HOST,
                         rng: random.Random | None = None) -> tuple[list[int], int]:
    """`count` free ports and the first of `block` consecutive free ports, all distinct."""
    chooser = rng or random.Random()
    low, high = _BLOCK_RANGE
    with ExitStack() as stack:
        for _ in range(_BLOCK_ATTEMPTS):
            base = chooser.randrange(low, high - block)
            if _hold_block(stack, host, base, block):
                return [_bind(stack, host, 0) for _ in range(count)], base
    raise OSError(f"no block of {block} consecutive free ports on {host} after {_BLOCK_ATTEMPTS} attempts")
