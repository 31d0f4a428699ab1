"""Where the next line starting with "." is, in message data: `find_dot_line(data, start, end)`.

It runs over every octet of every message (the DATA reader of the frontend, the dot-stuffing of the worker),
so for a 1 MiB message it must cost well under a millisecond. `data.find(b"\\r\\n.")` does not: it stops at
every CR (every line), about 1 GB/s. This finds the same index by memchr on "." (tens of GB/s).
Input: bytes or a bytearray, read only. See cluster/smtp/blockscan.py for the other checks of a block of lines.
"""

from __future__ import annotations

# find_dot_line: after DOT_MISSES dots that start no line within DOT_MISSES * DENSE_GAP octets (text with
# sentences, header fields with host names), the next PLAIN_SPAN octets are left to the plain search.
DOT_MISSES = 8
DENSE_GAP = 256
PLAIN_SPAN = 16 * 1024
_CR, _LF = 13, 10


def find_dot_line(data: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """Where the first line starting with "." begins: the index of its CRLF in data[start:end], as
    `data.find(b"\\r\\n.", start, end)` gives it, or -1.

    A "." is found by memchr at tens of GB/s, and most big bodies (base64, the benchmark's lines) have few or
    none, so the dots are looked at one by one. Where they come thick (about one per DENSE_GAP octets: a Python
    step per dot costs about what the plain search takes for that many octets), the plain search takes the next
    PLAIN_SPAN octets, so dense text costs about what it did, and a header full of dots does not send the whole
    body to the slow search."""
    if end is None:
        end = len(data)
    find = data.find
    position = start  # a match's CR is at `position` or after
    since = position
    misses = 0
    while True:
        dot = find(b".", position + 2, end)
        if dot < 0:
            return -1
        if data[dot - 1] == _LF and data[dot - 2] == _CR:
            return dot - 2
        position = dot - 1
        misses += 1
        if misses == DOT_MISSES:
            if dot - since < DOT_MISSES * DENSE_GAP:
                stop = min(end, position + PLAIN_SPAN)
                found = find(b"\r\n.", position, stop)
                if found >= 0 or stop == end:
                    return found
                position = stop - 2  # a match may straddle `stop`: its CR at stop - 2, its "." at stop
            misses = 0
            since = position
