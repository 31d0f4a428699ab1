"""POP3 proxy to the mailbox node that owns a maildrop (as Dovecot's proxy does), after the login was checked.

With several mailbox nodes, one Service spreads POP3 clients over all of them; a user's Maildir lives on one
(`cluster.mailbox.ownership`). The node a client reaches checks the password itself, then, when another node
owns the maildrop, `open_backend` logs in there with the same credentials: connect to the owner's POP3 port,
read its greeting, STLS first when the owner is not on loopback (ARCHITECTURE.md contract 5: the password
never crosses a network in clear; the owner's certificate is checked against `mailbox.node_ca_file` when set),
USER, PASS. On its "+OK" the glue sends that line to the client and `splice` copies bytes both ways until
either side closes or stays silent for the idle timeout. The owner does the locking, listing and deleting.

Failure modes: `BackendError` (owner unreachable, TLS failure, timeout, a reply that is not "+OK", or a
refused login: the users file differs between nodes) with a reason for the log; the client then gets
"-ERR [SYS/TEMP]" and may retry. Passwords are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

MAX_LINE = 512
# Seconds the owner gets to answer (QUIT: its UPDATE) after the client stopped sending.
BACKEND_GRACE = 30.0


class BackendError(Exception):
    """The owning node could not serve the login; the text says why (never the password)."""


async def _read_line(reader: asyncio.StreamReader, what: str) -> bytes:
    line = await reader.readline()
    if not line.endswith(b"\n"):
        raise BackendError(f"connection closed waiting for the reply to {what}")
    if len(line) > MAX_LINE:
        raise BackendError(f"reply to {what} too long")
    return line


async def _expect_ok(reader: asyncio.StreamReader, what: str) -> bytes:
    line = await _read_line(reader, what)
    if not line.startswith(b"+OK"):
        raise BackendError(f"{what} refused: {line[:200].decode('utf-8', 'replace').strip()}")
    return line


async def open_backend(host: str, port: int, username: str, password: str, *, tls: ssl.SSLContext | None,
                       implicit_tls: bool = False,
                       timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Log in at the owner; return its reader, writer and the "+OK" line answering PASS. With `tls`, STLS
    first, or TLS from the first byte when `implicit_tls` (the owner's port is a POP3S port)."""
    if any(ch in username + password for ch in "\r\n\0"):
        raise BackendError("line break in credentials")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls if implicit_tls else None)
            await _expect_ok(reader, "greeting")
            if tls is not None and not implicit_tls:
                writer.write(b"STLS\r\n")
                await _expect_ok(reader, "STLS")
                await writer.start_tls(tls)
            writer.write(b"USER " + username.encode() + b"\r\n")
            await _expect_ok(reader, "USER")
            writer.write(b"PASS " + password.encode() + b"\r\n")
            ok = await _expect_ok(reader, "PASS")
    except BackendError:
        if writer is not None:
            writer.close()
        raise
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        if writer is not None:
            writer.close()
        raise BackendError(f"{host}:{port}: {exc or type(exc).__name__}") from None
    return reader, writer, ok


class _Activity:
    """When bytes last moved in either direction: a session is idle only when both directions are."""

    def __init__(self) -> None:
        self.last = time.monotonic()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, activity: _Activity,
                idle_timeout: float) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        while (remaining := idle_timeout - (time.monotonic() - activity.last)) > 0:
            try:
                data = await asyncio.wait_for(reader.read(65536), remaining)
            except TimeoutError:
                continue  # the other direction may have moved meanwhile
            if not data:
                return
            activity.last = time.monotonic()
            writer.write(data)
            await writer.drain()


async def splice(client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 backend: tuple[asyncio.StreamReader, asyncio.StreamWriter], idle_timeout: float) -> None:
    """Copy bytes both ways until one side closes, or nothing moved either way for `idle_timeout`; then close
    the backend."""
    activity = _Activity()
    to_backend = asyncio.create_task(_pump(client[0], backend[1], activity, idle_timeout))
    from_backend = asyncio.create_task(_pump(backend[0], client[1], activity, idle_timeout))
    tasks = [to_backend, from_backend]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if to_backend.done() and not from_backend.done():
            # The client finished sending (e.g. QUIT, then half-close): let the owner answer and close.
            with contextlib.suppress(OSError, RuntimeError):
                if backend[1].can_write_eof():
                    backend[1].write_eof()
            await asyncio.wait([from_backend], timeout=BACKEND_GRACE)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        backend[1].close()
