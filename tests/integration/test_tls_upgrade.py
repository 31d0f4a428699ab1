"""`cluster.tls.start_tls`, the one upgrade path of SMTP STARTTLS and POP3 STLS (RFC 3207 4.2, RFC 2595 4,
CVE-2011-0411): what the client pipelined in plaintext behind its STARTTLS/STLS is dropped, never read inside
the TLS session, on a real socket pair."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme

from cluster.tls import server_context, start_tls

pytestmark = pytest.mark.integration


async def test_plaintext_pipelined_behind_the_upgrade_command_is_dropped(ca: trustme.CA, tmp_path: Path) -> None:
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    context = server_context(str(cert), str(key), "smtp")
    assert context is not None
    seen: list[object] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        # The injected command came in the same segment, so it is in the stream's buffer now.
        seen.append(await start_tls(reader, writer, context, b"+OK Begin TLS negotiation\r\n", 10))
        seen.append(await reader.readline())  # the first line read inside TLS
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"STLS\r\nDELE 1\r\n")
        assert await reader.readline() == b"+OK Begin TLS negotiation\r\n"
        await writer.start_tls(client_context, server_hostname="127.0.0.1")
        writer.write(b"CAPA\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert seen == [b"STLS\r\n", len(b"DELE 1\r\n"), b"CAPA\r\n"]
