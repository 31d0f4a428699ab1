"""TLS for the servers: contexts for STARTTLS (SMTP, RFC 3207; LMTP), STLS (POP3, RFC 2595) and implicit
TLS (RFC 8314), built once per process, and the one way a plaintext session is upgraded (`start_tls`); and
the client context for connections between cluster processes (LMTP, proxied POP3).

Input: a PEM certificate chain and key file, and the configuration section they come from ("smtp", "mailbox"),
so errors name the right keys. Output: an `ssl.SSLContext` accepting TLS 1.2 and newer with the `ssl`
module's default (secure) cipher choice, or None when no certificate is configured.
Failure modes: a missing, unreadable or mismatched certificate or key raises `ConfigError` naming the key,
so `mtacluster serve ROLE` and `mtacluster config check` end with one clear line instead of offering a TLS
upgrade that cannot work.

The upgrade rule (RFC 3207 4.2, RFC 2595 4, CVE-2011-0411): nothing the client sent before the handshake is
executed after it. Two halves, one for each layer: the protocol machine drops its own buffer when it accepts
STARTTLS/STLS (`cluster.sansio.ByteMachine._discard_plaintext_before_tls`), and the glue calls `start_tls`
here, which sends the machine's last plaintext reply, drops what the stream buffered since, and hands the
connection to TLS with no await in between, so no byte can slip through.
"""

from __future__ import annotations

import asyncio
import ssl

from cluster.config import ConfigError, check_readable


def server_context(cert_file: str, key_file: str, section: str) -> ssl.SSLContext | None:
    if not cert_file:
        return None
    check_readable(f"{section}.tls_cert_file", cert_file)
    check_readable(f"{section}.tls_key_file", key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Mail clients do not present certificates and we do not ask for one.
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"{section}.tls_key_file", f"cannot use {cert_file} with {key_file}: "
                          f"{exc.reason or exc}") from None
    return context


def discard_buffered_input(reader: asyncio.StreamReader) -> int:
    """Drop what `reader` holds unread and return its length.

    asyncio offers no public way to drop buffered input; `_buffer` is the StreamReader's bytearray (CPython
    3.11, tested in tests/unit/test_frontend_auth.py).
    """
    buffered = getattr(reader, "_buffer", None)
    if not isinstance(buffered, bytearray):
        return 0
    length = len(buffered)
    buffered.clear()
    return length


async def start_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext,
                    last_plaintext: bytes, timeout: float) -> int:
    """Send `last_plaintext` (the "220 Ready to start TLS" / "+OK Begin TLS negotiation" reply), then do the
    server side of the TLS handshake on the same connection. Returns how many plaintext bytes the client had
    sent after its STARTTLS/STLS, which were dropped unread.

    Raises OSError (ssl.SSLError, ConnectionError, TimeoutError) when the handshake fails or takes longer
    than `timeout` seconds; the connection is then unusable.
    """
    writer.write(last_plaintext)
    # From here to start_tls no await: the client's handshake must reach the TLS layer, and any plaintext it
    # pipelined behind the command is dropped now, not read later.
    discarded = discard_buffered_input(reader)
    await writer.start_tls(context, ssl_handshake_timeout=timeout)
    return discarded


def cluster_client_context(ca_file: str) -> ssl.SSLContext:
    """Client side of TLS between cluster processes (worker -> mailbox node LMTP, mailbox node -> mailbox node
    POP3 proxy). With `ca_file` the peer's chain must lead to it; without, the connection is encrypted but the
    peer is not checked. Host names are not checked: nodes are reached by pod names or addresses that the
    certificate rarely lists, and the CA is the cluster's own."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if ca_file:
        context.load_verify_locations(ca_file)
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
