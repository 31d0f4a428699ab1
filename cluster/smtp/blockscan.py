"""What a block of complete lines holds, found with numpy: `scan_block(data, end, limit)`.

The DATA reader (cluster/smtp/lines.py) checks every block of lines it takes: whether any CR or LF is bare or
any octet is NUL (RFC 5321 2.3.8), whether any octet is above 127, the length of the first line, and whether
any other line is longer than the limit. With the bytes methods (three counts for the bare CR and LF, a search
per half line for the long ones) that cost about 2 ms per MiB; numpy compares all the octets at once, in
place. Worth it from about `BIG_BLOCK` octets (a numpy call costs microseconds; below that the bytes methods
are as quick), so only the frontend's reader imports this.
Input: bytes or a bytearray, read only; no array outlives the call, so the bytearray can be resized after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Blocks of at least this many octets are checked by `scan_block` (cluster/smtp/lines.py).
BIG_BLOCK = 32 * 1024
# A block is looked at in pieces of at most this many octets, each ending a line, so that the comparisons
# write into the same three scratch arrays every time: fresh arrays of a block's size cost more in page faults
# than the comparisons themselves (1.2 ms per MiB in 1 MiB arrays, 0.4 ms in these).
PIECE = 256 * 1024
_CR, _LF = 13, 10
# The event loop's thread is the only caller (the DATA reader is sans-I/O, run by the session).
_IS_LF = np.empty(PIECE, np.bool_)
_IS_CR = np.empty(PIECE, np.bool_)
_UNPAIRED = np.empty(PIECE, np.bool_)


@dataclass(frozen=True)
class BlockScan:
    # A CR not followed by LF, an LF not after a CR, or a NUL (RFC 5321 2.3.8).
    bare: bool
    eight_bit: bool
    # Octets up to and including the first LF: the first line's length within the block, with its CRLF.
    first: int
    # A line after the first is longer than the limit (its CRLF included); exact when nothing is bare.
    too_long: bool


def scan_block(data: bytes | bytearray, end: int, limit: int, start: int = 0) -> BlockScan:
    """What data[start:end] holds; `end` > `start` and data[end - 1] is an LF (the block ends a line).

    Line lengths by windows, as the DATA reader's bytes path does: a line over `limit` is a run of at least
    `limit` octets without LF, which covers one of the windows of (limit + 1) // 2 octets laid end to end from
    a piece's start; only a piece with a window without LF has its lines measured one by one."""
    bare = data.find(b"\x00", start, end) >= 0
    first = data.find(b"\n", start, end) + 1 - start
    eight_bit = too_long = False
    window = (limit + 1) // 2
    block_start = start
    while start < end:
        stop = end
        if end - start > PIECE:
            stop = data.rfind(b"\n", start, start + PIECE) + 1
            if stop <= start:  # a line longer than a piece: the piece is that line
                stop = data.find(b"\n", start + PIECE, end) + 1
        size = stop - start
        octets = np.frombuffer(data, np.uint8, size, start)
        scratch = size <= PIECE
        line_feeds = np.equal(octets, _LF, out=_IS_LF[:size]) if scratch else octets == _LF
        returns = np.equal(octets, _CR, out=_IS_CR[:size]) if scratch else octets == _CR
        if not bare:
            unpaired = np.not_equal(returns[:-1], line_feeds[1:], out=_UNPAIRED[:size - 1] if scratch else None)
            bare = bool(returns[-1]) or bool(line_feeds[0]) or bool(unpaired.any())
        if not eight_bit:
            eight_bit = int(octets.max()) > 127
        windows = size // window
        if not too_long and windows and not line_feeds[:windows * window].reshape(windows, window).any(axis=1).all():
            ends = np.flatnonzero(line_feeds)
            longest = int(np.diff(ends).max()) if len(ends) > 1 else 0
            if start > block_start:  # a piece's first line is a whole line too (pieces end lines)
                longest = max(longest, int(ends[0]) + 1)
            too_long = longest > limit
        start = stop
    return BlockScan(bare, eight_bit, first, too_long)
