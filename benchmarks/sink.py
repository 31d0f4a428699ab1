"""The benchmark's final destination: Postfix's `smtp-sink`, with a running count of what it received.

`SmtpSink` starts `smtp-sink` on host:port (as the unprivileged user `nobody` when run as root) and follows
what it reports. By default it runs with `-c` and reads the counter lines ("sess=N quit=N mesg=N", separated
by carriage returns) from its stdout: `received` is the number of messages whose final "." the sink has read.
With `count_recipients=True` it runs with `-v` instead and reads the SMTP conversation from its stderr (one
"<program>: COMMAND" line per command, message content is not shown): `received` counts the "." lines and
`recipients` the RCPT lines, so a message with 100 recipients, relayed in two transactions of 50, adds 100.

`wait_for(count, deadline)` returns the monotonic time at which `received` first reached `count`;
`wait_for_recipients(count, deadline)` the time of the first "." read once `recipients` had reached `count`
(the end of the transaction that carried the last recipient, or of one running beside it: the error is at most
one message's transfer). `parse_counter(text)` and `parse_conversation(lines)` are the pure parsers.

Failure modes: smtp-sink missing or exiting early raises `SinkError` with its last stderr lines; the waits
raise `TimeoutError` naming how much arrived by the deadline.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_COUNTER = re.compile(rb"\bmesg=(\d+)")
_PROGRAM = b"smtp-sink"
SINK_BACKLOG = 1024
SINK_MAX_CONNECTIONS = 1000
_KEPT_STDERR_LINES = 20


class SinkError(RuntimeError):
    """smtp-sink could not be started or died."""


def parse_counter(text: bytes) -> int | None:
    """The message count in one smtp-sink counter line, or None when the line has none."""
    match = _COUNTER.search(text)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ConversationCounts:
    """What a run of `smtp-sink -v` conversation lines adds: RCPT commands and ends of DATA ("."), in order.

    `events` is "r" for a recipient and "." for an end of data, one character each, in the order read."""

    recipients: int
    messages: int
    events: str


def parse_conversation(lines: Iterable[bytes]) -> ConversationCounts:
    """Count the RCPT commands and the "." lines among `smtp-sink -v` stderr lines (other lines are ignored)."""
    events = []
    for raw in lines:
        # "<argv[0]>: COMMAND": the program name as started, e.g. "/usr/sbin/smtp-sink: RCPT TO:<a@b.example>".
        program, separator, command = raw.strip().partition(b": ")
        if not separator or not program.endswith(_PROGRAM):
            continue
        if command == b".":
            events.append(".")
        elif command[:5].upper() == b"RCPT ":
            events.append("r")
    text = "".join(events)
    return ConversationCounts(text.count("r"), text.count("."), text)


def sink_command(binary: str, host: str, port: int, as_root: bool, count_recipients: bool = False) -> list[str]:
    command = [binary, "-v" if count_recipients else "-c", "-m", str(SINK_MAX_CONNECTIONS)]
    if as_root:
        command += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
    return [*command, f"{host}:{port}", str(SINK_BACKLOG)]


class SmtpSink:
    def __init__(self, host: str, port: int, binary: str = "smtp-sink", count_recipients: bool = False) -> None:
        self.host = host
        self.port = port
        self.binary = binary
        self.count_recipients = count_recipients
        self.received = 0
        self.recipients = 0
        # reached_at[i] is when the message count reached i + 1.
        self.reached_at: list[float] = []
        # (time, recipients so far) at each "." read, with count_recipients.
        self.dots: list[tuple[float, int]] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_KEPT_STDERR_LINES)
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()

    async def start(self) -> None:
        command = sink_command(self.binary, self.host, self.port, os.geteuid() == 0, self.count_recipients)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise SinkError(f"{self.binary} is not installed (it comes with Postfix)") from exc
        if self.count_recipients:
            self._readers = [asyncio.create_task(self._drain(self._process.stdout)),
                             asyncio.create_task(self._read_conversation())]
        else:
            self._readers = [asyncio.create_task(self._read_counters()),
                             asyncio.create_task(self._drain(self._process.stderr, keep=True))]

    async def _drain(self, stream: asyncio.StreamReader | None, keep: bool = False) -> None:
        """Read a stream the sink writes to, so its pipe never fills; keep its last lines for error messages."""
        assert stream is not None
        while line := await stream.readline():
            if keep:
                self._stderr_tail.append(line.decode(errors="replace").rstrip())

    async def _read_counters(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        pending = b""
        while chunk := await self._process.stdout.read(65536):
            now = time.monotonic()
            *lines, pending = (pending + chunk).split(b"\r")
            counts = [c for c in map(parse_counter, lines) if c is not None]
            if counts and max(counts) > self.received:
                self._record(max(counts), now)
        self._changed.set()

    async def _read_conversation(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        pending = b""
        while chunk := await self._process.stderr.read(65536):
            now = time.monotonic()
            *lines, pending = (pending + chunk).split(b"\n")
            counts = parse_conversation(lines)
            self._stderr_tail.extend(line.decode(errors="replace").rstrip() for line in lines[-_KEPT_STDERR_LINES:])
            recipients = self.recipients
            for event in counts.events:
                if event == "r":
                    recipients += 1
                else:
                    self.dots.append((now, recipients))
            self.recipients = recipients
            if counts.messages:
                self._record(self.received + counts.messages, now)
            self._changed.set()
        self._changed.set()

    def _record(self, count: int, now: float) -> None:
        self.reached_at.extend([now] * (count - self.received))
        self.received = count
        self._changed.set()

    def _exit_code(self) -> int | None:
        return None if self._process is None else self._process.returncode

    def exited(self) -> bool:
        return self._process is None or self._process.returncode is not None

    @property
    def pid(self) -> int | None:
        """The running sink's process id (None before `start` and after it exited)."""
        return None if self.exited() or self._process is None else self._process.pid

    async def wait_for(self, count: int, deadline: float) -> float:
        """Monotonic time at which the sink had received `count` messages; TimeoutError after `deadline`."""
        await self._wait(lambda: self.received >= count, deadline,
                         lambda: f"the sink received {self.received} of {count} messages by the deadline")
        return self.reached_at[count - 1]

    async def wait_for_recipients(self, count: int, deadline: float) -> float:
        """Monotonic time of the first end of data after the sink had `count` recipients (count_recipients)."""
        if not self.count_recipients:
            raise ValueError("this sink does not count recipients (count_recipients=False)")

        def first_dot() -> float | None:
            return next((at for at, seen in self.dots if seen >= count), None)

        await self._wait(lambda: first_dot() is not None, deadline,
                         lambda: f"the sink received {self.recipients} of {count} recipients by the deadline")
        at = first_dot()
        assert at is not None
        return at

    async def _wait(self, done: Callable[[], bool], deadline: float,
                    timeout_message: Callable[[], str]) -> None:
        while not done():
            if self.exited() or any(reader.done() for reader in self._readers):
                raise SinkError(f"smtp-sink exited (code {self._exit_code()}) after {self.received} messages: "
                                f"{self.stderr_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(timeout_message())
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                continue

    def stderr_tail(self) -> str:
        return " / ".join(self._stderr_tail)

    async def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except TimeoutError:
                process.kill()
                await process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._process = None
