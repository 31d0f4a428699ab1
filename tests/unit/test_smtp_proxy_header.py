"""PROXY protocol v1/v2 headers: whole, split at every byte, and malformed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.smtp.proxy import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse_proxy_header


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


V1_TCP4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n"
V2_TCP6 = v2(1, 0x21, bytes(15) + b"\x01" + bytes(16) + struct.pack("!HH", 51000, 25) + b"\x04\x00\x01x")


@pytest.mark.parametrize(("header", "expected"), [
    (V1_TCP4, ProxyHeader("192.0.2.7", 40000, len(V1_TCP4))),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n", ProxyHeader("2001:db8::1", 1, 40)),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(None, None, 15)),
    (v2(1, 0x11, bytes([192, 0, 2, 9, 10, 0, 0, 1]) + struct.pack("!HH", 1234, 25)),
     ProxyHeader("192.0.2.9", 1234, 28)),
    (V2_TCP6, ProxyHeader("::1", 51000, len(V2_TCP6))),
    (v2(0, 0x00, b""), ProxyHeader(None, None, 16)),
])
def test_valid_headers_whole_and_byte_by_byte(header: bytes, expected: ProxyHeader) -> None:
    smtp = b"EHLO client\r\n"
    assert parse_proxy_header(header + smtp) == expected
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None


@pytest.mark.parametrize("data", [
    b"EHLO client\r\n", b"PROXY TCP4 1.2.3.4\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 25\r\n",
    b"PROXY TCP4 2001:db8::1 5.6.7.8 1 25\r\n", b"PROXY TCP4 " + b"1" * 120,
    b"PROXY TCP4 a.b.c.d 5.6.7.8 1 2\r\n", V2_SIGNATURE + b"\x31\x11\x00\x00", V2_SIGNATURE + b"\x2f\x11\x00\x00",
    v2(1, 0x31, b"/tmp/sock"),
])
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


@given(st.binary(max_size=300))
def test_arbitrary_input_never_raises_anything_else(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    assert result is None or 0 < result.consumed <= len(data)
