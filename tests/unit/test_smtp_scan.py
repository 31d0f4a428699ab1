"""The scans of cluster/smtp/scan.py and blockscan.py against the plain bytes methods and line splits they replace."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cluster.smtp import blockscan, scan
from cluster.smtp.blockscan import BlockScan, scan_block
from cluster.smtp.scan import DOT_MISSES, PLAIN_SPAN, find_dot_line

# Few octets, so that dots, CRs and LFs meet often (and a run of dots passes DOT_MISSES).
octets = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"a"]), max_size=80).map(b"".join)


@given(octets, st.integers(0, 90), st.one_of(st.none(), st.integers(0, 300)), st.integers(1, 3), st.integers(3, 9))
def test_find_dot_line_is_find_of_crlf_dot(data: bytes, start: int, end: int | None, misses: int, span: int) -> None:
    expected = data.find(b"\r\n.", start, end)
    assert find_dot_line(data, start, end) == expected
    assert find_dot_line(bytearray(data), start, end) == expected
    # With small limits, every switch between the dot by dot search and the plain one happens within a few octets.
    saved = scan.DOT_MISSES, scan.DENSE_GAP, scan.PLAIN_SPAN
    scan.DOT_MISSES, scan.DENSE_GAP, scan.PLAIN_SPAN = misses, 4, span
    try:
        assert find_dot_line(data, start, end) == expected
    finally:
        scan.DOT_MISSES, scan.DENSE_GAP, scan.PLAIN_SPAN = saved


def test_find_dot_line_after_many_dots_that_start_no_line() -> None:
    text = b"Sentences. End. With. Dots." * DOT_MISSES + b"\r\n"
    body = text * 3 + b"\r\n.stuffed\r\n" + text
    assert find_dot_line(body) == body.find(b"\r\n.") == len(text) * 3
    assert find_dot_line(text * 4) == -1
    # Dense dots in a header, then a long body without any, then a dot line past the plain search's span.
    header = b"Received: from a.b.c.d (a.b.c.d [192.0.2.1]) by e.f.g.h; 1.2.3\r\n" * 3 + b"\r\n"
    long_body = header + b"x" * 78 + (b"\r\n" + b"x" * 78) * (PLAIN_SPAN // 40) + b"\r\n.\r\n"
    assert find_dot_line(long_body) == long_body.find(b"\r\n.") == len(long_body) - 5
    assert find_dot_line(b"x\r\n.", 0) == 1
    assert find_dot_line(b"x\r\n.", 2) == -1 and find_dot_line(b"x\r\n.", 0, 3) == -1


def reference_scan(block: bytes, limit: int) -> BlockScan:
    """The block split into lines: bare CR/LF/NUL anywhere, octets above 127, the first line's length (by LF,
    with it), and whether a later one is longer than `limit`."""
    pieces = block.split(b"\r\n")
    bare = any(octet in piece for piece in pieces for octet in (b"\r", b"\n", b"\x00"))
    lengths = [len(line) + 1 for line in block.split(b"\n")[:-1]]  # each with its LF
    return BlockScan(bare, not block.isascii(), lengths[0], any(length > limit for length in lengths[1:]))


blocks = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"\x00", b"\xc3\xa9", b"x", b"y" * 30, b"."]),
                  max_size=60).map(lambda parts: b"".join(parts) + b"\r\n")


@given(blocks, st.binary(max_size=5), st.integers(3, 70), st.integers(1, 40))
def test_scan_block_is_what_the_lines_hold(block: bytes, after: bytes, limit: int, piece: int) -> None:
    for data in (block + after, bytearray(block + after)):
        assert scan_block(data, len(block), limit) == reference_scan(block, limit)
    saved = blockscan.PIECE
    blockscan.PIECE = piece  # many pieces, each ending a line (or a line longer than a piece)
    try:
        assert scan_block(block, len(block), limit) == reference_scan(block, limit)
    finally:
        blockscan.PIECE = saved


def test_scan_block_examples() -> None:
    assert scan_block(b"a\rb\r\n", 5, 998).bare and scan_block(b"a\nb\r\n", 5, 998).bare
    assert scan_block(b"a\0\r\n", 4, 998).bare and not scan_block(b"ab\r\n\r\n", 6, 998).bare
    lines = b"x" * 10 + b"\r\n" + b"y" * 8 + b"\r\n"
    assert scan_block(lines, len(lines), 10) == BlockScan(False, False, 12, False)  # the first line is the caller's
    assert scan_block(lines + b"z" * 9 + b"\r\n", len(lines) + 11, 10).too_long


def test_scan_block_leaves_a_bytearray_resizable() -> None:
    buffer = bytearray(b"x" * 100 + b"\r\n" + b"tail")
    assert scan_block(buffer, 102, 998) == BlockScan(False, False, 102, False)
    del buffer[:102]  # no numpy array still holds its buffer
    assert buffer == b"tail"
