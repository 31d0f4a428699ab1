"""The frontend's sessions in one process, no sockets: CPU per message of the Python work of an SMTP session.

    python -m benchmarks.frontend_session [--messages 3000] [--size 4] [--repeat 5] [--source DIR]
                                          [--profile FILE.prof]

Builds the real `Frontend` (cluster/frontend/server.py) from a minimal configuration, and for each message makes
one `InboundSession` on a scripted transport and plays smtp-source's conversation into it, one command at a time,
each after the previous reply (a new connection per message, as `make bench` sends mail): connect, greeting,
EHLO, MAIL, RCPT, DATA, the message, QUIT, close. The shard client is a stub whose inject answers a turn of the
event loop later (so the end of DATA waits, as it does for a real shard). Prints the CPU (`time.process_time`)
per message of each of `--repeat` runs and their best and median, then a JSON line ("stored": the messages the
stub took, the 200 of the warm-up included).

What it leaves out, on purpose: the kernel, uvloop's C code, ZeroMQ and the bus (benchmarks/frontend_alone.py
measures the whole process). So its figure moves only with the Python work of a session, steadily to a few
percent even on a busy machine: the harness for A/B runs of a change to that work (`--source DIR` imports
`cluster` from another checkout, as frontend_alone does). Failure modes: a session that does not answer as
smtp-source expects raises RuntimeError naming the step.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.frontend_alone import RECIPIENT, SENDER, use_source

HELO = "bench.example"


def message_body(size: int) -> bytes:
    """About `size` octets as smtp-source sends them: a few header fields, then lines of text, dot-terminated."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: Mon, 30 Nov 2026 04:00:00 +0000\r\n"
            "Message-Id: <1.2.3@bench.example>\r\n\r\n").encode()
    line = b"La de da de da 1. La de da de da 2. La de da de da 3. La de da de da 4.\r\n"
    return head + line * max(1, (size - len(head)) // len(line)) + b".\r\n"


class Transport:
    """What a session uses of an asyncio transport: every write is a reply batch; close ends the connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.protocol: Any = None
        self.writes: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lost)

    def _lost(self) -> None:
        protocol, self.protocol = self.protocol, None  # as asyncio's and uvloop's transports let go of it
        protocol.connection_lost(None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class StubShards:
    """The shard client: every inject is stored a loop turn later (the accepts of both checkouts' signatures)."""

    def __init__(self) -> None:
        self.number = 0

    async def inject(self, sender: str, recipients: list[str], body: bytes, client: dict[str, str],
                     head: bytes = b"") -> tuple[Any, list[str]]:
        from cluster.smtp import replies

        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, None)
        await future
        self.number += 1
        queue_id = f"stub{self.number:010d}"
        return replies.queued_as([queue_id]), [queue_id]


async def one_session(frontend: Any, listener: Any, commands: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    transport = Transport(loop)
    session = frontend._session(listener)
    transport.protocol = session
    for step, command in enumerate([b"", *commands]):
        transport.waiter = loop.create_future()
        if step == 0:
            session.connection_made(transport)
        else:
            session.data_received(command)
        if not transport.writes:
            await transport.waiter
        reply = transport.writes.pop()
        if reply[:1] not in (b"2", b"3") or transport.writes:
            raise RuntimeError(f"step {step} ({command[:20]!r}): unexpected reply {reply[:80]!r}")
    await asyncio.sleep(0)  # connection_lost


async def run_all(args: argparse.Namespace, config_path: Path) -> tuple[list[float], int]:
    from cluster.cli.common import load
    from cluster.frontend.server import Frontend

    frontend = Frontend(load(argparse.Namespace(config=str(config_path))))
    shards = StubShards()
    frontend.shards = shards  # type: ignore[assignment]
    frontend.accounts.shards.bind(shards)  # type: ignore[attr-defined]
    listener = frontend.listeners["smtp"]
    commands = [f"EHLO {HELO}\r\n".encode(), f"MAIL FROM:<{SENDER}>\r\n".encode(),
                f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"DATA\r\n", message_body(args.size * 1024), b"QUIT\r\n"]
    for _ in range(200):  # warm-up
        await one_session(frontend, listener, commands)
    figures = []
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    for _ in range(args.repeat):
        if profiler is not None:
            profiler.enable()
        started = time.process_time()
        for _ in range(args.messages):
            await one_session(frontend, listener, commands)
        figures.append((time.process_time() - started) * 1000 / args.messages)
        if profiler is not None:
            profiler.disable()
    if profiler is not None:
        profiler.dump_stats(args.profile)
    frontend.deadlines.close()
    return figures, shards.number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4, help="message payload in KiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--source", help="run the sessions with this directory's `cluster` package (A/B runs)")
    parser.add_argument("--profile", help="cProfile (CPU clock) of the measured runs into this file")
    args = parser.parse_args(argv)
    if args.source:
        os.environ["FRONTEND_ALONE_SOURCE"] = str(Path(args.source).resolve())
        use_source()
    import uvloop

    from cluster import logs

    # The role's logging, as `mtacluster serve` sets it up (an accepted line per message), into /dev/null.
    stderr = sys.stderr
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the handler keeps it for the run)
    logs.configure("frontend")
    sys.stderr = stderr
    with tempfile.TemporaryDirectory(prefix="frontend-session-") as tmp:
        config = Path(tmp) / "mtacluster.toml"
        config.write_text("\n".join([
            "[smtp]", 'hostname = "bench-frontend.localdomain"', 'listen = ["127.0.0.1:2525"]', "",
            "[queue]", 'shards = ["tcp://127.0.0.1:1"]', f'spool_dir = "{Path(tmp) / "spool"}"', ""]))
        figures, stored = uvloop.run(run_all(args, config))
    for number, figure in enumerate(figures, 1):
        print(f"run {number}: {figure * 1000:.1f} us CPU per message", file=sys.stderr)
    import cluster

    result = {"messages": args.messages, "size_kib": args.size, "stored": stored,
              "us_per_message": [round(f * 1000, 2) for f in figures],
              "best": round(min(figures) * 1000, 2), "median": round(statistics.median(figures) * 1000, 2),
              "cluster_from": str(Path(cluster.__file__).parent)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
