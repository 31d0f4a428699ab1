"""PROXY header edges that test_smtp_proxy_header.py did not pin down (found by mutation testing): the exact
107-byte v1 limit, ports 0 and 65535, separators, UNKNOWN with addresses, v2 fields read unsigned, v2 address
blocks of exactly the minimum length, and what each refusal says."""

from __future__ import annotations

import struct

import pytest

from cluster.smtp.proxy import V1_MAX_LENGTH, V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse_proxy_header

TCP6_PREFIX = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 "


def v1_of_length(length: int) -> bytes:
    """A valid TCP6 v1 header of exactly `length` bytes with its CRLF (the destination port is padded)."""
    port = "25".rjust(length - len(TCP6_PREFIX) - 2, "0")
    header = TCP6_PREFIX + port.encode() + b"\r\n"
    assert len(header) == length
    return header


def v2(version_command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", version_command, family, len(body) if length is None else length) + body


def refusal(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as caught:
        parse_proxy_header(data)
    return str(caught.value)


def test_a_v1_header_of_exactly_107_bytes_is_read_and_108_is_refused() -> None:
    longest = v1_of_length(V1_MAX_LENGTH)
    assert parse_proxy_header(longest + b"EHLO x\r\n") == ProxyHeader("2001:db8::1", 1, V1_MAX_LENGTH)
    assert refusal(v1_of_length(V1_MAX_LENGTH + 1)) == "PROXY v1 header longer than 107 bytes"


def test_an_unterminated_v1_header_is_refused_once_it_reaches_107_bytes() -> None:
    unterminated = v1_of_length(V1_MAX_LENGTH)[:-2]
    assert parse_proxy_header(unterminated[:V1_MAX_LENGTH - 1]) is None
    assert refusal(unterminated + b"25") == "PROXY v1 header longer than 107 bytes"


@pytest.mark.parametrize(("header", "port"), [(b"PROXY TCP4 192.0.2.7 198.51.100.1 0 25\r\n", 0),
                                              (b"PROXY TCP4 192.0.2.7 198.51.100.1 65535 25\r\n", 65535)])
def test_v1_ports_at_the_ends_of_their_range(header: bytes, port: int) -> None:
    assert parse_proxy_header(header) == ProxyHeader("192.0.2.7", port, len(header))


def test_v1_unknown_may_carry_addresses_which_are_ignored() -> None:
    header = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert parse_proxy_header(header) == ProxyHeader(None, None, len(header))


@pytest.mark.parametrize(("data", "message"), [
    (b"PROXY TCP4  192.0.2.7 198.51.100.1 1 25\r\n", "PROXY v1 header must be 'PROXY TCP4|TCP6 src dst sport dport'"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 x\r\n", "PROXY v1 header has a malformed address or port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n", "PROXY v1 header address family or port out of range"),
    (b"PROXY TCP6 192.0.2.7 198.51.100.1 1 25\r\n", "PROXY v1 header address family or port out of range"),
    (b"PROXY TCP4 \xff\r\n", "PROXY v1 header is not ASCII"),
    (b"HELO x\r\n", "connection did not start with a PROXY protocol header"),
    (b"PROXYX", "connection did not start with a PROXY protocol header"),
    (v2(0x30, 0x11, bytes(12)), "PROXY v2 header with an unknown version"),
    (v2(0x22, 0x11, bytes(12)), "PROXY v2 header with an unknown command"),
    (v2(0x21, 0x31, bytes(12)), "PROXY v2 header with an unsupported address family"),
    (v2(0x21, 0x21, bytes(35)), "PROXY v2 header with an unsupported address family"),
    (v2(0x21, 0x01, b""), "PROXY v2 header with an unsupported address family"),
])
def test_each_refusal_says_what_is_wrong(data: bytes, message: str) -> None:
    assert refusal(data) == message


def test_v2_fields_are_unsigned() -> None:
    source = bytes([203, 0, 113, 200])
    header = v2(0x21, 0x11, source + bytes(4) + struct.pack("!HH", 65000, 25))
    assert parse_proxy_header(header) == ProxyHeader("203.0.113.200", 65000, len(header))
    # A length field above 32767 read signed would be negative and the header "complete" at once.
    assert parse_proxy_header(v2(0x21, 0x11, b"", length=40000)) is None


def test_v2_address_blocks_of_exactly_the_minimum_length() -> None:
    tcp4 = v2(0x21, 0x11, bytes([192, 0, 2, 1]) + bytes(4) + struct.pack("!HH", 1, 2))
    tcp6 = v2(0x21, 0x21, bytes(15) + b"\x02" + bytes(16) + struct.pack("!HH", 3, 4))
    assert parse_proxy_header(tcp4) == ProxyHeader("192.0.2.1", 1, 28)
    assert parse_proxy_header(tcp6) == ProxyHeader("::2", 3, 52)
    assert parse_proxy_header(v2(0x20, 0x11, b"")) == ProxyHeader(None, None, 16)  # LOCAL
    assert parse_proxy_header(v2(0x21, 0x00, b"xyz")) == ProxyHeader(None, None, 19)  # UNSPEC
