"""The benchmark's final destination: Postfix's `smtp-sink`, with a running count of messages received.

`SmtpSink` starts `smtp-sink -c` on host:port (as the unprivileged user `nobody` when run as root) and reads
its counter lines ("sess=N quit=N mesg=N", separated by carriage returns) from a pipe. `received` is the number
of messages whose final "." the sink has read; `wait_for(count, deadline)` returns the monotonic time at which
the sink first reached `count`. `parse_counter(text)` is the pure parser.

Failure modes: smtp-sink missing or exiting early raises `SinkError` with its stderr; `wait_for` raises
`TimeoutError` naming how many messages arrived by the deadline.
"""

from __future__ import annotations

import asyncio
import os
import re
import time

_COUNTER = re.compile(rb"\bmesg=(\d+)")
SINK_BACKLOG = 1024
SINK_MAX_CONNECTIONS = 1000


class SinkError(RuntimeError):
    """smtp-sink could not be started or died."""


def parse_counter(text: bytes) -> int | None:
    """The message count in one smtp-sink counter line, or None when the line has none."""
    match = _COUNTER.search(text)
    return int(match.group(1)) if match else None


def sink_command(binary: str, host: str, port: int, as_root: bool) -> list[str]:
    command = [binary, "-c", "-m", str(SINK_MAX_CONNECTIONS)]
    if as_root:
        command += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
    return [*command, f"{host}:{port}", str(SINK_BACKLOG)]


class SmtpSink:
    def __init__(self, host: str, port: int, binary: str = "smtp-sink") -> None:
        self.host = host
        self.port = port
        self.binary = binary
        self.received = 0
        # reached_at[i] is when the count reached i + 1.
        self.reached_at: list[float] = []
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        command = sink_command(self.binary, self.host, self.port, os.geteuid() == 0)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise SinkError(f"{self.binary} is not installed (it comes with Postfix)") from exc
        self._reader = asyncio.create_task(self._read_counters())

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

    def _record(self, count: int, now: float) -> None:
        self.reached_at.extend([now] * (count - self.received))
        self.received = count
        self._changed.set()

    def _exit_code(self) -> int | None:
        return None if self._process is None else self._process.returncode

    def exited(self) -> bool:
        return self._process is None or self._process.returncode is not None

    async def wait_for(self, count: int, deadline: float) -> float:
        """Monotonic time at which the sink had received `count` messages; TimeoutError after `deadline`."""
        while self.received < count:
            if self.exited() or (self._reader is not None and self._reader.done()):
                raise SinkError(f"smtp-sink exited (code {self._exit_code()}) after {self.received} messages: "
                                f"{await self._stderr()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the sink received {self.received} of {count} messages by the deadline")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                continue
        return self.reached_at[count - 1]

    async def _stderr(self) -> str:
        if self._process is None or self._process.stderr is None:
            return ""
        try:
            data = await asyncio.wait_for(self._process.stderr.read(4096), 1.0)
        except TimeoutError:
            return ""
        return data.decode(errors="replace").strip()

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
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._process = None

