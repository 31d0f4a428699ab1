"""Accept-latency probe: a small asyncio SMTP client that times end of DATA -> 250, side by side with the load.

`run_probe(settings, sessions, stop, interval)` opens `sessions` connections; each sends messages one after
another on its connection (MAIL, RCPT, DATA, body, "."), starting one at most every `interval` seconds, until
`stop` is set or `max_messages` were sent in all, and
records the seconds between writing the final "." (RFC 5321 4.1.1.4) and reading the complete reply. Only 250
replies count as accepted; other replies are counted as refused (with the first reply text kept), a broken
connection is reopened. `send_one(...)` sends a single message (used to warm up and check the path).

The SMTP dialogue is minimal on purpose: no pipelining, no TLS, one recipient per message, like smtp-source.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

READ_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
RECONNECT_DELAY = 0.1


class SmtpProbeError(RuntimeError):
    """The server answered something unexpected, or the connection failed."""


@dataclass
class ProbeResult:
    latencies: list[float] = field(default_factory=list)
    refused: int = 0
    connection_errors: int = 0
    first_error: str = ""

    @property
    def accepted(self) -> int:
        return len(self.latencies)

    def note_error(self, text: str) -> None:
        if not self.first_error:
            self.first_error = text


def make_body(size: int, sender: str, recipient: str, subject: str = "benchmark probe") -> bytes:
    """A message of about `size` payload bytes in 78-character lines, dot-stuffing never needed (no leading dot)."""
    header = f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    full, rest = divmod(size, len(line))
    return header + line * full + (b"y" * max(rest - 2, 0) + b"\r\n" if rest else b"")


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One (possibly multiline) reply: RFC 5321 4.2.1, "ddd-" continues, "ddd " ends."""
    lines = []
    while True:
        raw = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        if not raw:
            raise SmtpProbeError("connection closed by the server")
        line = raw.decode(errors="replace").rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            break
    code = lines[-1][:3]
    if not code.isdigit():
        raise SmtpProbeError(f"malformed reply {lines[-1]!r}")
    return int(code), " / ".join(lines)


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, helo: str) -> _Session:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        session = cls(reader, writer)
        await session.expect(None, 220)
        await session.expect(f"EHLO {helo}", 250)
        return session

    async def command(self, line: str | None) -> tuple[int, str]:
        if line is not None:
            self.writer.write(line.encode() + b"\r\n")
            await self.writer.drain()
        return await _read_reply(self.reader)

    async def expect(self, line: str | None, code: int) -> None:
        got, text = await self.command(line)
        if got != code:
            raise SmtpProbeError(f"{line or 'greeting'}: expected {code}, got {text}")

    async def send(self, sender: str, recipient: str, body: bytes) -> tuple[int, str, float]:
        """One transaction; returns the final reply and its latency (end of DATA -> reply)."""
        for line, code in ((f"MAIL FROM:<{sender}>", 250), (f"RCPT TO:<{recipient}>", 250), ("DATA", 354)):
            got, text = await self.command(line)
            if got != code:
                await self.command("RSET")
                return got, text, 0.0
        self.writer.write(body)
        await self.writer.drain()
        started = time.perf_counter()
        self.writer.write(b".\r\n")
        await self.writer.drain()
        got, text = await _read_reply(self.reader)
        return got, text, time.perf_counter() - started

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await self.writer.drain()
            await asyncio.wait_for(_read_reply(self.reader), 2.0)
        except (OSError, SmtpProbeError, TimeoutError):
            pass  # the server may already have gone; closing below is all that matters
        self.writer.close()
        # A reset at close changes nothing for the measurement.
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass(frozen=True)
class ProbeSettings:
    host: str
    port: int
    size: int
    sender: str = "probe@bench.example"
    recipient: str = "sink@bench.example"
    helo: str = "probe.bench.example"


async def send_one(settings: ProbeSettings) -> tuple[int, str]:
    """Send one message on a fresh connection; the final reply (raises SmtpProbeError on a broken dialogue)."""
    try:
        session = await _Session.open(settings.host, settings.port, settings.helo)
    except (OSError, TimeoutError) as exc:
        raise SmtpProbeError(f"cannot connect to {settings.host}:{settings.port}: {exc}") from exc
    try:
        body = make_body(settings.size, settings.sender, settings.recipient, "benchmark warm-up")
        code, text, _ = await session.send(settings.sender, settings.recipient, body)
        return code, text
    except (OSError, TimeoutError) as exc:
        raise SmtpProbeError(f"connection failed: {exc}") from exc
    finally:
        await session.close()


async def run_probe(settings: ProbeSettings, sessions: int, stop: asyncio.Event, interval: float = 0.0,
                    max_messages: int = 100_000) -> ProbeResult:
    result = ProbeResult()
    budget = [max_messages]
    body = make_body(settings.size, settings.sender, settings.recipient)

    async def one_session() -> None:
        session: _Session | None = None
        try:
            next_start = time.monotonic()
            while not stop.is_set() and budget[0] > 0:
                # Pacing: each session starts a transaction at most every `interval` seconds, so the probe
                # observes the load instead of adding much of its own.
                delay = next_start - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                next_start = time.monotonic() + interval
                try:
                    if session is None:
                        session = await _Session.open(settings.host, settings.port, settings.helo)
                    budget[0] -= 1
                    code, text, latency = await session.send(settings.sender, settings.recipient, body)
                except (OSError, TimeoutError, SmtpProbeError) as exc:
                    result.connection_errors += 1
                    result.note_error(str(exc) or type(exc).__name__)
                    if session is not None:
                        session.writer.close()
                    session = None
                    # Back off a little so a server that is down is not hammered with reconnects.
                    await asyncio.sleep(RECONNECT_DELAY)
                    continue
                if code == 250:
                    result.latencies.append(latency)
                else:
                    result.refused += 1
                    result.note_error(text)
        finally:
            if session is not None:
                await session.close()

    await asyncio.gather(*(one_session() for _ in range(sessions)))
    return result
