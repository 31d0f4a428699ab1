"""Every inbound session is released (its per-client and total connection counts given back), however it ends.

Sessions run in-process on a real listening socket, under asyncio and under uvloop (what the roles run), with a
host that counts admissions and releases: a STARTTLS handshake the client cuts or never starts (the TLS layer
does not tell the session that its connection closed), and a policy check that fails with a bug while an earlier
decision waited (the replies made before it still reach the client, then the session ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from cluster.config import config_from_dict
from cluster.frontend.deadline import Deadlines
from cluster.frontend.policy import SessionPolicy
from cluster.frontend.server import Frontend
from cluster.frontend.session import InboundSession, Listener

pytestmark = pytest.mark.integration

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


class CountingHost:
    """The frontend's side of a session, reduced to what these tests look at."""

    shards = None

    def __init__(self) -> None:
        self.deadlines = Deadlines(0.05)
        self.admitted = 0
        self.released = 0

    def admit(self, session: InboundSession, ip: str) -> None:
        self.admitted += 1

    def release(self, session: InboundSession) -> None:
        self.released += 1

    def may_relay(self, ip: str) -> bool:
        return False


class WaitThenFail(SessionPolicy):
    """MAIL waits (as for a DNS answer); RCPT fails with a bug."""

    async def check_mail(self, facts: Any, sender: Any, params: Any) -> None:
        await asyncio.sleep(0.05)

    async def check_rcpt(self, facts: Any, recipient: Any) -> None:
        raise KeyError("a bug in a check")


def pki(tmp_path: Path) -> tuple[str, str]:
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return str(cert_file), str(key_file)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, policy: SessionPolicy) -> AsyncIterator[tuple[int, CountingHost]]:
    cert_file, key_file = pki(tmp_path)
    config = config_from_dict({
        "smtp": {"hostname": "mta.test", "listen": ["127.0.0.1:2525"], "tls_cert_file": cert_file,
                 "tls_key_file": key_file, "command_timeout": 1, "spf": "off",
                 "reject_unknown_sender_domain": False},
        "queue": {"shards": ["tcp://127.0.0.1:1"]}}, environ={})
    settings, security = Frontend._security(config)
    host = CountingHost()
    server = await asyncio.get_running_loop().create_server(
        lambda: InboundSession(host, config=config.smtp, listener=Listener("smtp", settings, policy),
                               security=security), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], host
    finally:
        server.close()
        host.deadlines.close()


async def released(host: CountingHost, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while host.released < host.admitted and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return host.admitted == host.released == 1 and len(host.deadlines) == 0


async def starttls(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO client.test\r\nSTARTTLS\r\n")
    while not (await reader.readline()).startswith(b"220 "):
        pass
    return reader, writer


def run(loop: str, test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    LOOPS[loop](test())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_starttls_handshake_the_client_resets_releases_the_session(loop: str, tmp_path: Path) -> None:
    async def test() -> None:
        async with serving(tmp_path, SessionPolicy()) as (port, host):
            _, writer = await starttls(port)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST in the middle of the handshake
            assert await released(host), (host.admitted, host.released, len(host.deadlines))
    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_starttls_handshake_that_never_starts_times_out_and_releases_the_session(loop: str,
                                                                                  tmp_path: Path) -> None:
    async def test() -> None:
        async with serving(tmp_path, SessionPolicy()) as (port, host):
            _, writer = await starttls(port)  # and then silence: the handshake timeout is command_timeout (1 s)
            try:
                assert await released(host), (host.admitted, host.released, len(host.deadlines))
            finally:
                writer.close()
    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_check_that_fails_after_a_waiting_one_flushes_its_replies_and_ends_the_session(
        loop: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        async with serving(tmp_path, WaitThenFail()) as (port, host):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"EHLO client.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
            received = b""
            while chunk := await asyncio.wait_for(reader.read(4096), 5):  # ends with the server's close
                received += chunk
            writer.close()
            assert received.endswith(b"250 2.1.0 Sender ok\r\n"), received
            assert await released(host), (host.admitted, host.released, len(host.deadlines))
    run(loop, test)
    assert "a decision failed" in caplog.text
