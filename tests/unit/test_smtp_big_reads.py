"""Message data that arrives in big reads (32 KiB or more, as a socket hands over a 1 MiB message), where the
DATA reader checks runs of lines by numpy (cluster/smtp/blockscan.py) at their real sizes: whatever the cut, the
message is the one that was sent, what the client sent after it is read as commands, and the smuggling defence
(ARCHITECTURE.md contract 4) still refuses a bare line ending inside such a run."""

from __future__ import annotations

import itertools

import pytest

from cluster.smtp import replies
from tests.support.smtp_driver import greeted, make_session

LINE = b"x" * 78 + b"\r\n"
# About 240 KiB: long runs of plain lines around lines that start with "." (stuffed on the wire).
BODY = b"".join([LINE * 700, b".leading dot\r\n", LINE * 900, b"..two dots\r\n", b".\r\n", LINE * 1500])
OPENING = greeted(b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"DATA")


def dot_stuff(body: bytes) -> bytes:
    return b"".join(b"." + line if line.startswith(b".") else line for line in body.splitlines(keepends=True))


def reads(data: bytes, size: int) -> list[bytes]:
    return [data[start:start + size] for start in range(0, len(data), size)]


@pytest.mark.parametrize("size", [40_000, 262_144])
def test_a_body_in_big_reads_is_the_message_sent_and_what_follows_is_read(size: int) -> None:
    session = make_session()
    session.feed(OPENING)
    for data in reads(dot_stuff(BODY) + b".\r\nQUIT\r\n", size):
        session.feed(data)
    assert [message.data for message in session.messages] == [BODY]
    assert [reply.code for reply in session.replies][-2:] == [250, 221]
    assert session.conn.closed


def test_big_reads_that_cut_the_terminator_and_mix_with_small_ones() -> None:
    wire = dot_stuff(BODY) + b".\r\nQUIT\r\n"
    end = len(wire) - len(b".\r\nQUIT\r\n")
    session = make_session()
    session.feed(OPENING)
    # A small read first (the session's buffer then holds the start of a line), big ones, and the terminator
    # split between the last big read and a small one.
    cuts = [0, 1000, 1000 + 70_001, 1000 + 140_002, end + 1, len(wire)]
    for start, stop in itertools.pairwise(cuts):
        session.feed(wire[start:stop])
    assert [message.data for message in session.messages] == [BODY]
    assert session.replies[-1].code == 221


@pytest.mark.parametrize("bare", [b"\n.\n", b"\r.\r\n"])
def test_a_bare_line_ending_inside_a_big_read_is_refused(bare: bytes) -> None:
    """The smuggling family: "\\n.\\n" inside a big run ends nothing, and the message is refused, not cut."""
    body = LINE * 1000 + b"MAIL FROM:<smuggled@example.org>" + bare + LINE * 1000
    session = make_session()
    session.feed(OPENING)
    for data in reads(body + b".\r\nQUIT\r\n", 65_536):
        session.feed(data)
    assert session.messages == []
    assert replies.BARE_LINE_ENDING_IN_DATA in session.replies
    assert session.replies[-1].code == 221
