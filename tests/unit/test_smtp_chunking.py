"""CHUNKING (RFC 3030): BDAT chunks are exact octet counts; the same content rules as DATA apply."""

from __future__ import annotations

import pytest

from cluster.smtp import replies
from cluster.smtp.address import Address
from cluster.smtp.blockscan import BIG_BLOCK
from cluster.smtp.events import MessageReceived, SessionEnded
from cluster.smtp.lines import ChunkReader
from cluster.smtp.replies import Reply
from cluster.smtp.server import ServerSettings
from tests.support.smtp_driver import QUEUED, Session, greeted, run, server_settings

CHUNKING = server_settings(chunking=True)
OPENING = greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>")


def bdat(data: bytes, *, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def feed(data: bytes, chunking: str, settings: ServerSettings = CHUNKING) -> Session:
    if chunking == "one":
        return run([data], settings)
    return run([data[i : i + 1] for i in range(len(data))], settings)


def test_chunking_is_advertised_only_when_enabled() -> None:
    assert "CHUNKING" in run([b"EHLO c\r\n"], CHUNKING).replies[-1].lines
    assert "CHUNKING" not in run([b"EHLO c\r\n"]).replies[-1].lines
    assert run([OPENING + bdat(b"x\r\n", last=True)]).replies[-2] == replies.UNKNOWN_COMMAND


@pytest.mark.parametrize("chunking", ["one", "bytes"])
def test_message_in_several_chunks_is_exact(chunking: str) -> None:
    # A CRLF split across two chunks, a lone "." line, and "\r\n.\r\n" inside: all plain content in BDAT.
    parts = [b"Subject: x\r", b"\n\r\n.\r\n..dots\r\n", b"", b"end\r\n"]
    wire = OPENING + b"".join(bdat(p) for p in parts[:-1]) + bdat(parts[-1], last=True) + b"QUIT\r\n"
    session = feed(wire, chunking)
    (message,) = session.messages
    assert message == MessageReceived(
        sender=Address("a", "b.example"),
        recipients=(Address("c", "d.example"),),
        data=b"".join(parts),
        body_8bit=False,
        smtputf8=False,
    )
    assert session.replies[4:] == [
        replies.chunk_received(len(parts[0])),
        replies.chunk_received(len(parts[1])),
        replies.chunk_received(0),
        QUEUED,
        replies.BYE,
    ]


def test_bdat_zero_last_and_missing_final_crlf() -> None:
    session = run([OPENING + bdat(b"no newline") + b"BDAT 0 last\r\n"], CHUNKING)
    assert session.messages[0].data == b"no newline\r\n"


def test_timeout_kind_is_data_while_reading_a_chunk() -> None:
    session = run([OPENING + b"BDAT 10\r\nabc"], CHUNKING)
    assert session.conn.current_timeout_kind == "data"
    session.feed(b"defghij")
    assert session.conn.current_timeout_kind == "command"


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (b"EHLO c\r\n" + bdat(b"QUIT\r\n", last=True), replies.NEED_MAIL_BEFORE_DATA),
        (bdat(b"QUIT\r\n", last=True), replies.NEED_HELO),
        (greeted(b"MAIL FROM:<a@b.example>") + bdat(b"QUIT\r\n", last=True), replies.NO_VALID_RECIPIENTS),
    ],
)
def test_refused_bdat_still_discards_its_chunk(commands: bytes, expected: Reply) -> None:
    session = run([commands + b"NOOP\r\n"], CHUNKING)
    assert session.replies[-2:] == [expected, replies.OK]
    assert not session.conn.closed  # the QUIT inside the chunk was data, not a command


@pytest.mark.parametrize("line", [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 10 NOW", b"BDAT 1 LAST more"])
def test_bdat_syntax(line: bytes) -> None:
    assert run([OPENING + line + b"\r\n"], CHUNKING).replies[-1] == replies.BDAT_SYNTAX


def test_data_after_bdat_is_refused() -> None:
    session = run([OPENING + bdat(b"x\r\n") + b"DATA\r\n"], CHUNKING)
    assert session.replies[-1] == replies.DATA_AFTER_BDAT


@pytest.mark.parametrize("chunking", ["one", "bytes"])
@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([b"a\nb\r\n"], replies.BARE_LINE_ENDING_IN_DATA),
        ([b"a\r", b"b\r\n"], replies.BARE_LINE_ENDING_IN_DATA),
        ([b"a\x00\r\n"], replies.BARE_LINE_ENDING_IN_DATA),
        ([b"a\r"], replies.BARE_LINE_ENDING_IN_DATA),
        ([b"x" * 600, b"y" * 399 + b"\r\n"], replies.TEXT_LINE_TOO_LONG),
    ],
)
def test_content_rules_apply_across_chunks(parts: list[bytes], expected: Reply, chunking: str) -> None:
    wire = OPENING + b"".join(bdat(p) for p in parts) + b"BDAT 0 LAST\r\nNOOP\r\n"
    session = feed(wire, chunking)
    assert session.messages == []
    assert expected in session.replies
    assert session.replies[-1] == replies.OK


def test_oversized_chunks_fail_the_transaction_and_later_chunks_are_discarded() -> None:
    settings = server_settings(chunking=True, max_message_size=100)
    wire = OPENING + bdat(b"z" * 98 + b"\r\n") + bdat(b"more\r\n") + bdat(b"RSET\r\n", last=True) + b"NOOP\r\n"
    session = run([wire], settings)
    assert session.replies[-4:] == [
        replies.chunk_received(100),
        replies.MESSAGE_TOO_BIG,
        replies.NEED_MAIL_BEFORE_DATA,
        replies.OK,
    ]
    assert session.messages == []


def test_eof_inside_a_chunk_never_emits_a_message() -> None:
    session = run([OPENING + b"BDAT 100 LAST\r\npartial", b""], CHUNKING)
    assert session.messages == []
    assert session.events[-1] == SessionEnded("client closed the connection during BDAT")


def test_8bit_chunk_content_is_flagged() -> None:
    (message,) = run([OPENING + bdat("caf\u00e9\r\n".encode(), last=True)], CHUNKING).messages
    assert message.body_8bit and message.data == "caf\u00e9\r\n".encode()


def test_final_bare_cr_counts_towards_the_line_length() -> None:
    settings = server_settings(chunking=True, max_text_line=5)
    session = run([OPENING + bdat(b"abc\r", last=True)], settings)
    assert session.replies[-1] == replies.BARE_LINE_ENDING_IN_DATA
    assert session.messages == []


def test_smtp_chunking_turns_chunking_on_and_off() -> None:
    from cluster.config import ConfigError, SmtpConfig, config_from_dict

    default = ServerSettings.from_config(config_from_dict({}, environ={}).smtp)
    assert default.chunking is True  # the built-in default, as Postfix since 3.4
    on = run([b"EHLO c\r\n"], default)
    assert "CHUNKING" in on.replies[1].lines
    off = run([OPENING + bdat(b"x\r\n", last=True)], ServerSettings.from_config(SmtpConfig(chunking=False)))
    assert "CHUNKING" not in off.replies[1].lines
    assert replies.UNKNOWN_COMMAND in off.replies
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"smtp": {"chunking": "yes"}}, environ={})
    assert caught.value.key == "smtp.chunking"


LINES = b"x" * 78 + b"\r\n"
BIG_CHUNK = LINES * (BIG_BLOCK // len(LINES) + 1)  # checked by numpy (cluster/smtp/blockscan.py)


@pytest.mark.parametrize(("chunks", "bare", "too_long", "eight_bit"), [
    ([BIG_CHUNK + b"ab\rcd", b"\r\n"], True, False, False),  # a CR inside the unfinished last line
    ([BIG_CHUNK + b"ab\0", b"\r\n"], True, False, False),
    ([BIG_CHUNK + b"ab\r", b"\n" + BIG_CHUNK], False, False, False),  # the CRLF split over two chunks
    ([BIG_CHUNK + b"ab\r", b"c" + BIG_CHUNK], True, False, False),
    ([BIG_CHUNK + b"y" * 997, b"\r\n" + BIG_CHUNK], False, False, False),  # 999 + CRLF > 1000 would be too long
    ([BIG_CHUNK + b"y" * 999, b"\r\n" + BIG_CHUNK], False, True, False),
    ([BIG_CHUNK + b"y" * 998 + b"\r", b"\n" + BIG_CHUNK], False, False, False),
    ([BIG_CHUNK + b"\xc3\xa9\r\n" + BIG_CHUNK], False, False, True),
    ([BIG_CHUNK[:-1], b"\n" + BIG_CHUNK.replace(b"x" * 78, b"z" * 1100, 1)], False, True, False),
])
def test_big_chunks_are_judged_as_the_line_by_line_check_does(chunks: list[bytes], bare: bool, too_long: bool,
                                                              eight_bit: bool) -> None:
    reader = ChunkReader(1000, 10**8)
    for chunk in chunks:
        reader.start_chunk(len(chunk), keep=True)
        assert reader.feed(bytearray(chunk))
    result = reader.result()
    assert (result.bare_line_ending, result.line_too_long, result.has_8bit) == (bare, too_long, eight_bit)
    assert (result.data == b"".join(chunks)) == (not bare and not too_long)
