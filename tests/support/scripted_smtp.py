"""A small SMTP server for tests whose answers the test scripts: per-recipient refusals, refusing the first N
connections, recording when each connection came. Runs its own event loop in a thread.

smtp-sink covers "every RCPT fails"; this covers what it cannot ("this one recipient fails", "down until the
third attempt, and at what times did the attempts come").
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.tooling import free_port


@dataclass
class ReceivedMessage:
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class ScriptedSmtpServer:
    host: str
    port: int = 0
    # Reply to RCPT for an address, e.g. lambda a: "550 5.1.1 No such user here" if "bad" in a else None.
    rcpt_reply: Callable[[str], str | None] = lambda address: None
    # Reply to the n-th connection's greeting (n from 1), e.g. "421 4.3.2 Not now" to refuse it.
    greeting_reply: Callable[[int], str | None] = lambda n: None
    connection_times: list[float] = field(default_factory=list)
    messages: list[ReceivedMessage] = field(default_factory=list)

    def start(self) -> ScriptedSmtpServer:
        self.port = self.port or free_port(self.host)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._session, self.host, self.port, reuse_address=True)
            started.set()

        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        started.wait(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connection_times.append(time.time())
        number = len(self.connection_times)

        def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        try:
            refusal = self.greeting_reply(number)
            if refusal:
                say(refusal)
                await writer.drain()
                return
            say(f"220 {self.host} scripted ESMTP")
            sender, recipients = "", []
            while line := await reader.readline():
                command = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = command[:4].upper()
                if verb in ("EHLO", "HELO"):
                    say("250-scripted\r\n250 8BITMIME" if verb == "EHLO" else "250 scripted")
                elif verb == "MAIL":
                    sender, recipients = command.split(":", 1)[1].split()[0].strip("<>"), []
                    say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    address = command.split(":", 1)[1].split()[0].strip("<>")
                    reply = self.rcpt_reply(address)
                    if reply is None:
                        recipients.append(address)
                        say("250 2.1.5 Ok")
                    else:
                        say(reply)
                elif verb == "DATA":
                    say("354 End data with <CR><LF>.<CR><LF>")
                    await writer.drain()
                    data = bytearray()
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        data += chunk[1:] if chunk.startswith(b".") else chunk
                    self.messages.append(ReceivedMessage(sender, recipients, bytes(data)))
                    say("250 2.0.0 Ok: queued")
                elif verb == "RSET":
                    sender, recipients = "", []
                    say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    say("221 2.0.0 Bye")
                    await writer.drain()
                    return
                else:
                    say("250 2.0.0 Ok")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()
