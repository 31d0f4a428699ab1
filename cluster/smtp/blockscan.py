"""What a block of complete lines holds, found with numpy: `scan_block(data, end)`.

The DATA reader (cluster/smtp/lines.py) checks every block of lines it takes: whether any CR or LF is bare or
any octet is NUL (RFC 5321 2.3.8), whether any octet is above 127, and the length of the first line and of the
longest of the others (each with its CRLF). With the bytes methods (three counts for the bare CR and LF, a
search per half line for the long ones) that cost about 2 ms per MiB; numpy compares all the octets at once,
in place. Worth it from about `BIG_BLOCK` octets (a numpy call costs microseconds; below that the bytes
methods are as quick), so only the frontend's reader of big messages imports this.
Input: bytes or a bytearray, read only; no array outlives the call, so the bytearray can be resized after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Blocks of at least this many octets are checked by `scan_block` (cluster/smtp/lines.py).
BIG_BLOCK = 32 * 1024
_CR, _LF = 13, 10


@dataclass(frozen=True)
class BlockScan:
    # A CR not followed by LF, an LF not after a CR, or a NUL (RFC 5321 2.3.8).
    bare: bool
    eight_bit: bool
    # Octets up to and including the first LF, and the most from one LF (excluded) to the next (included):
    # line lengths with their CRLF, exact when nothing is bare.
    first: int
    longest: int


def scan_block(data: bytes | bytearray, end: int) -> BlockScan:
    """What data[:end] holds; `end` >= 1 and data[end - 1] is an LF (the block ends a line)."""
    octets = np.frombuffer(data, np.uint8, end)
    line_feeds = octets == _LF
    returns = octets == _CR
    bare = bool(returns[-1]) or bool(line_feeds[0]) or not np.array_equal(returns[:-1], line_feeds[1:]) \
        or data.find(b"\x00", 0, end) >= 0
    eight_bit = int(octets.max()) > 127
    ends = np.flatnonzero(line_feeds)
    first = int(ends[0]) + 1
    longest = int(np.diff(ends).max()) if len(ends) > 1 else 0
    return BlockScan(bare, eight_bit, first, longest)
