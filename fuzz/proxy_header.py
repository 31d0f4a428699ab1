"""Fuzz target: the PROXY protocol v1/v2 header parser (cluster/smtp/proxy.py).

Input: raw bytes, a v1 line built from fuzz-chosen tokens, or a v2 header (signature, version/command, family,
length, address block) with fuzz-chosen fields, each followed by what the client sends next.

Invariants: the only exception is `ProxyHeaderError`; a parsed header consumed between 1 and len(data) bytes,
has a client address exactly when it has a port, the address is a valid IP address and the port is in
0..65535; parsing is stable under more input (the header parsed from the first `consumed` bytes is the same,
and a prefix that gave a header keeps giving it when more bytes follow); a v1 header is at most 107 bytes.
"""

from __future__ import annotations

import ipaddress
import struct

from cluster.smtp.proxy import V1_MAX_LENGTH, V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse_proxy_header
from fuzz.common import Choices

V1_TOKENS = (b"PROXY", b"TCP4", b"TCP6", b"UNKNOWN", b"192.0.2.1", b"2001:db8::1", b"::ffff:1.2.3.4", b"65535",
             b"65536", b"0", b"-1", b"1.2.3", b"", b"\xff")


def header_bytes(choices: Choices) -> bytes:
    kind = choices.below(3)
    if kind == 0:
        return choices.chunk()
    if kind == 1:
        tokens = [choices.pick(V1_TOKENS) if choices.flag() else choices.chunk(20) for _ in range(choices.below(8))]
        return b"PROXY " + b" ".join(tokens) + choices.pick((b"\r\n", b"\n", b""))
    version_command, family = choices.byte(), choices.byte()
    block = choices.chunk()
    length = len(block) if choices.flag() else choices.byte() | choices.byte() << 8
    return V2_SIGNATURE + struct.pack("!BBH", version_command, family, length) + block


def parse(data: bytes) -> ProxyHeader | ProxyHeaderError | None:
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError as exc:
        assert str(exc), "ProxyHeaderError without a message"
        return exc


def fuzz_one(data: bytes) -> None:
    choices = Choices(data)
    stream = header_bytes(choices) + choices.rest()
    result = parse(stream)
    if isinstance(result, ProxyHeader):
        assert 1 <= result.consumed <= len(stream), result
        assert (result.client_ip is None) == (result.client_port is None), result
        if result.client_ip is not None:
            ipaddress.ip_address(result.client_ip)
            assert result.client_port is not None and 0 <= result.client_port <= 65535, result
        if not stream.startswith(V2_SIGNATURE):
            assert result.consumed <= V1_MAX_LENGTH, result
        assert parse(stream[:result.consumed]) == result, "header changes when the bytes after it are cut"
    for cut in range(0, len(stream), max(1, len(stream) // 16)):
        prefix = parse(stream[:cut])
        if isinstance(prefix, ProxyHeader):
            assert prefix == result, f"{cut} bytes gave {prefix}, all of them {result}"
        elif isinstance(prefix, ProxyHeaderError):
            assert isinstance(result, ProxyHeaderError), f"{cut} bytes were refused, all of them gave {result}"
