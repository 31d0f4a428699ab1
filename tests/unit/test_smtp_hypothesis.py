"""Property tests for the sans-I/O SMTP server: exact data transfer, robustness, chunking independence."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.smtp import lines
from cluster.smtp.address import (
    Address,
    AddressError,
    ParameterError,
    parse_forward_path,
    parse_mail_parameters,
    parse_reverse_path,
)
from cluster.smtp.lines import ChunkReader, DataReader, DataResult
from tests.support.smtp_driver import greeted, run, server_settings

OPENING = greeted(b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"DATA")
SMALL_LIMITS = server_settings(
    max_command_line=40,
    max_text_line=60,
    max_message_size=400,
    max_errors=50,
    chunking=True,
)

# Octets allowed inside a text line: anything but CR, LF and NUL (RFC 5321 2.3.8).
line_octets = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))
dotty_line = st.one_of(line_octets, line_octets.map(lambda b: b"." + b), st.sampled_from([b".", b"..", b""]))
bodies = st.lists(dotty_line, max_size=20).map(lambda lines: b"".join(line + b"\r\n" for line in lines))

# Fragments that steer arbitrary input towards interesting states.
FRAGMENTS = [
    b"EHLO c\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"RCPT TO:<c@d.example>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"QUIT\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"\r",
    b"\n",
    b"\x00",
    b".",
    b"..",
    b"x" * 70,
    b"MAIL FROM:<> SIZE=5\r\n",
    b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 7 LAST\r\n",
]
noisy_input = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), max_size=30).map(b"".join)


def dot_stuff(body: bytes) -> bytes:
    return b"".join(b"." + line if line.startswith(b".") else line for line in body.splitlines(keepends=True))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_received_data_equals_the_original_body(body: bytes, cuts: list[int]) -> None:
    wire = OPENING + dot_stuff(body) + b".\r\nQUIT\r\n"
    session = run(chunked(wire, cuts), server_settings(max_text_line=200))
    (message,) = session.messages
    assert message.data == body


@settings(max_examples=200, deadline=None)
@given(body=bodies, sizes=st.lists(st.integers(min_value=0, max_value=50), max_size=8))
def test_bdat_chunks_reassemble_the_body(body: bytes, sizes: list[int]) -> None:
    chunks: list[bytes] = []
    rest = body
    for size in sizes:
        chunks.append(rest[:size])
        rest = rest[size:]
    chunks.append(rest)
    wire = greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>")
    for index, chunk in enumerate(chunks):
        last = b" LAST" if index == len(chunks) - 1 else b""
        wire += b"BDAT %d%s\r\n" % (len(chunk), last) + chunk
    settings = server_settings(max_text_line=200, chunking=True)
    (message,) = run([wire], settings).messages
    assert message.data == body


def terminators(data: bytes) -> int:
    # The DATA command's own CRLF can serve as the first CRLF of CRLF.CRLF, so count ".\r\n" after any CRLF;
    # a BDAT ... LAST command ends a message too.
    return data.count(b"\r\n.\r\n") + data.count(b"\n.\r\n") + data.upper().count(b" LAST")


@settings(max_examples=300, deadline=None)
@given(data=noisy_input)
def test_arbitrary_input_never_raises_nor_invents_messages(data: bytes) -> None:
    session = run([data, b""], SMALL_LIMITS)
    assert len(session.messages) <= terminators(data)
    assert session.conn.closed
    assert len(session.conn._input) == 0


@settings(max_examples=300, deadline=None)
@given(data=noisy_input, opening=st.booleans())
def test_byte_by_byte_equals_one_chunk(data: bytes, opening: bool) -> None:
    if opening:
        data = OPENING + data
    whole = run([data, b""], SMALL_LIMITS)
    bytewise = run([*(data[i : i + 1] for i in range(len(data))), b""], SMALL_LIMITS)
    assert bytewise.events == whole.events
    assert bytewise.output == whole.output


# --- DataReader against a line-by-line reference implementation ---

DATA_FRAGMENTS = [b"\r\n", b"\r", b"\n", b".", b"..", b"\x00", b"\xc3\xa9", b"x", b"y" * 30, b"\r\n.\r\n", b".\r\n"]
data_streams = st.lists(st.one_of(st.sampled_from(DATA_FRAGMENTS), st.binary(max_size=6)), max_size=40).map(b"".join)


def reference_data_phase(stream: bytes, max_text_line: int, max_size: int) -> tuple[DataResult, int] | None:
    """RFC 5321 4.5.2 the obvious way: split on CRLF, stop at the "." line, unstuff, then judge."""
    lines: list[bytes] = []
    position = 0
    while True:
        end = stream.find(b"\r\n", position)
        if end < 0:
            return None
        line = stream[position:end]
        position = end + 2
        if line == b".":
            break
        lines.append(line)
    data = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    bare = any(octet in line for line in lines for octet in (b"\r", b"\n", b"\x00"))
    too_long = any(len(line) + 2 > max_text_line for line in lines)
    too_big = len(data) > max_size
    refused = bare or too_long or too_big
    result = DataResult(
        data=None if refused else data,
        size=len(data),
        bare_line_ending=bare,
        line_too_long=too_long,
        too_big=too_big,
        has_8bit=not data.isascii(),
    )
    return result, position


@settings(max_examples=400, deadline=None)
@given(
    stream=data_streams,
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    max_text_line=st.integers(min_value=3, max_value=40),
    max_size=st.integers(min_value=0, max_value=200),
)
def test_data_reader_matches_reference(stream: bytes, cuts: list[int], max_text_line: int, max_size: int) -> None:
    data_reader_matches_reference(stream, cuts, max_text_line, max_size)
    with every_block_big():
        data_reader_matches_reference(stream, cuts, max_text_line, max_size)


@contextlib.contextmanager
def every_block_big() -> Iterator[None]:
    """The readers check every block of lines (DATA) or chunk piece (BDAT) as a big one (numpy,
    cluster/smtp/blockscan.py), however small."""
    saved = lines.BIG_BLOCK
    lines.BIG_BLOCK = 1
    try:
        yield
    finally:
        lines.BIG_BLOCK = saved


def data_reader_matches_reference(stream: bytes, cuts: list[int], max_text_line: int, max_size: int) -> None:
    expected = reference_data_phase(stream, max_text_line, max_size)
    reader = DataReader(max_text_line, max_size)
    buffer = bytearray()
    result = None
    consumed = 0
    for chunk in chunked(stream, cuts):
        buffer += chunk
        consumed += len(chunk)
        result = reader.feed(buffer)
        if result is not None:
            break
    if expected is None:
        assert result is None
        assert len(buffer) <= max_text_line + 1  # memory stays bounded by one text line
        return
    expected_result, end = expected
    assert result == expected_result
    assert bytes(buffer) == stream[end:consumed]


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.sampled_from([0, 1, 76, 499, 500, 501, 996, 997, 998, 999, 1500]), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=4),
)
def test_data_reader_finds_long_lines_at_the_real_limit(lengths: list[int], cuts: list[int]) -> None:
    """Lines around the default 1000-octet limit in big blocks (the reader checks them by windows, not line by
    line), the stream cut anywhere: the same verdict as the line-by-line reference."""
    stream = b"".join(b"x" * length + b"\r\n" for length in lengths) + b".\r\n"
    expected = reference_data_phase(stream, 1000, 10**7)
    assert expected is not None
    for all_big in (False, True):
        with every_block_big() if all_big else contextlib.nullcontext():
            reader = DataReader(1000, 10**7)
            buffer = bytearray()
            result = None
            for chunk in chunked(stream, cuts):
                buffer += chunk
                result = reader.feed(buffer)
                if result is not None:
                    break
            assert result == expected[0]


# --- address parsing ---

printable_local = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
utf8_local = st.text(alphabet=st.characters(min_codepoint=32, blacklist_categories=("Cs", "Cc")), max_size=20)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


@settings(max_examples=300, deadline=None)
@given(local=printable_local, domain=domains)
def test_address_str_round_trips(local: str, domain: str) -> None:
    address = Address(local, domain)
    assert parse_forward_path(f"<{address}>") == address


@settings(max_examples=200, deadline=None)
@given(local=utf8_local, domain=domains)
def test_utf8_address_str_round_trips_with_smtputf8(local: str, domain: str) -> None:
    address = Address(local, domain)
    if len(str(address).encode()) + 2 > 256 or len(local.encode()) > 64:
        return
    assert parse_forward_path(f"<{address}>", smtputf8=True) == address


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=80), smtputf8=st.booleans())
def test_path_parsers_only_raise_address_errors(text: str, smtputf8: bool) -> None:
    for parse in (parse_forward_path, parse_reverse_path):
        try:
            parse(text, smtputf8=smtputf8)
        except AddressError as problem:
            assert problem.reply.code in (501, 553)
    try:
        parse_mail_parameters(text)
    except ParameterError as problem:
        assert problem.reply.code == 501


@settings(max_examples=400, deadline=None)
@given(
    stream=data_streams,
    sizes=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
    max_text_line=st.integers(min_value=3, max_value=40),
    max_size=st.integers(min_value=0, max_value=200),
)
def test_chunk_reader_matches_reference(stream: bytes, sizes: list[int], max_text_line: int, max_size: int) -> None:
    chunk_reader_matches_reference(stream, sizes, max_text_line, max_size)
    with every_block_big():
        chunk_reader_matches_reference(stream, sizes, max_text_line, max_size)


def chunk_reader_matches_reference(stream: bytes, sizes: list[int], max_text_line: int, max_size: int) -> None:
    reader = ChunkReader(max_text_line, max_size)
    rest = stream
    for size in [*sizes, len(stream)]:
        chunk, rest = rest[:size], rest[size:]
        reader.start_chunk(len(chunk), keep=True)
        buffer = bytearray(chunk)
        assert reader.feed(buffer)
        assert buffer == b""
    result = reader.result()
    lines = stream.split(b"\r\n")
    bare = any(octet in line for line in lines for octet in (b"\r", b"\n", b"\x00"))
    too_long = any(len(line) + 2 > max_text_line for line in lines)
    too_big = len(stream) > max_size
    assert (result.bare_line_ending, result.line_too_long, result.too_big) == (bare, too_long, too_big)
    if not (bare or too_long or too_big):
        assert result.data == (stream if stream.endswith(b"\r\n") or not stream else stream + b"\r\n")
