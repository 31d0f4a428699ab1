"""PROXY protocol v1 and v2 header parser (HAProxy's spec, "The PROXY protocol", versions 1 and 2).

A TCP load balancer in front of the frontends (Kubernetes LoadBalancer, HAProxy) prepends one header to each
connection saying who the real client is. With `smtp.proxy_protocol = true` the frontend reads it before the
SMTP greeting; the relay policy and the Received header then use the real client address.

`parse_proxy_header(data)` returns None while more bytes are needed, a `ProxyHeader` once a whole header was
read (`consumed` bytes of `data` belong to it; the rest is SMTP), or raises `ProxyHeaderError` for anything
malformed. A LOCAL (v2) or UNKNOWN (v1) header, such as a health check sends, has no client address.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107  # spec section 2.1: the longest v1 line, CRLF included


class ProxyHeaderError(ValueError):
    """The connection did not start with a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    client_ip: str | None
    client_port: int | None
    consumed: int


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        return None
    if end + 2 > V1_MAX_LENGTH:
        raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
    try:
        parts = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 header is not ASCII") from None
    if parts[:2] == ["PROXY", "UNKNOWN"]:
        return ProxyHeader(None, None, end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 header must be 'PROXY TCP4|TCP6 src dst sport dport'")
    try:
        source = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        ports = [int(p) for p in parts[4:6]]
    except ValueError:
        raise ProxyHeaderError("PROXY v1 header has a malformed address or port") from None
    if (source.version == 4) != (parts[1] == "TCP4") or not all(0 <= p < 65536 for p in ports):
        raise ProxyHeaderError("PROXY v1 header address family or port out of range")
    return ProxyHeader(str(source), ports[0], end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2:
        raise ProxyHeaderError("PROXY v2 header with an unknown version")
    total = 16 + length
    if len(data) < total:
        return None
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the balancer's own connection (health check)
        return ProxyHeader(None, None, total)
    if command != 0x1:
        raise ProxyHeaderError("PROXY v2 header with an unknown command")
    body = data[16:total]
    if family == 0x11 and length >= 12:  # TCP over IPv4
        source, _, port, _ = struct.unpack("!4s4sHH", body[:12])
        return ProxyHeader(str(ipaddress.IPv4Address(source)), port, total)
    if family == 0x21 and length >= 36:  # TCP over IPv6
        source, _, port, _ = struct.unpack("!16s16sHH", body[:36])
        return ProxyHeader(str(ipaddress.IPv6Address(source)), port, total)
    if family == 0x00:  # UNSPEC
        return ProxyHeader(None, None, total)
    raise ProxyHeaderError("PROXY v2 header with an unsupported address family")


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
        return None  # could still become a v2 signature
    if data.startswith(b"PROXY "):
        return _parse_v1(data)
    if b"PROXY ".startswith(data[:6]):
        return None
    raise ProxyHeaderError("connection did not start with a PROXY protocol header")
