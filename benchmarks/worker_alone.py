"""The delivery worker alone: its CPU per message, with a scripted shard on the bus and smtp-sink as destination.

```
.venv/bin/python -m benchmarks.worker_alone                          # 3,000 x 4 KiB, 4 jobs in flight
.venv/bin/python -m benchmarks.worker_alone --messages 5000 --in-flight 8 --recipients 1 --size 4096
.venv/bin/python -m benchmarks.worker_alone --profile /tmp/worker.stacks   # CPU-time sampler
.venv/bin/python -m benchmarks.worker_alone --summarize /tmp/worker.stacks  # its top functions
.venv/bin/python -m benchmarks.worker_alone --profile /tmp/worker.prof     # cProfile on a CPU clock
.venv/bin/python -m benchmarks.worker_alone --source /tmp/old               # the worker from /tmp/old/cluster
```

What runs: `smtp-sink` (benchmarks/sink.py) on a free port; one `mtacluster serve worker` process whose
`delivery.smarthost` is the sink and whose only shard is this script (a ZeroMQ ROUTER socket speaking the
dispatch protocol of cluster/bus/schemas.py: every Heartbeat is acked, the Results it lists as finished are
revoked, and `--in-flight` Delivers are kept outstanding: each Result is answered by the next Deliver). The
first `--warmup` messages open the worker's connections and warm its caches; the figure is the worker process's
user+system CPU time (/proc/PID/stat) from the end of the warm-up until the last Result, divided by the
messages of that span. Every outcome must be "delivered" and the sink must count every message (else the run
fails). With `--profile FILE` the worker runs profiled on its CPU clock (time the process spends preempted is
charged to nothing; see `profiled_worker`) and writes FILE when it stops; the CPU figure then includes the
profiler's overhead.

The last line of stdout is one JSON object: messages, recipients, in_flight, cpu_ms_per_message, wall seconds,
messages/s, and the worker's peak RSS. Failure modes: a worker that does not heartbeat within `--start-timeout`
or a run that does not finish within `--time-limit` raises `HarnessError` naming what was missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

from benchmarks import checkout
from benchmarks.cluster_instance import mtacluster_command, stop_process
from benchmarks.ports import HOST, free_ports
from benchmarks.profiled import run_profiled, summary
from benchmarks.sink import SmtpSink
from cluster.bus.schemas import Deliver, Heartbeat, HeartbeatAck, OutcomeKind, Result, decode

EPOCH = "worker-alone"
SOURCE_VARIABLE = "WORKER_ALONE_SOURCE"
_TICKS = os.sysconf("SC_CLK_TCK")


class HarnessError(RuntimeError):
    """The worker did not start, or a run did not finish (or not cleanly)."""


def message_body(size: int) -> bytes:
    """A plain-text message of about `size` bytes, lines of 70 characters, no line starting with "."."""
    head = (b"From: <bench@bench.example>\r\nTo: <user@dest.example>\r\nSubject: worker alone\r\n"
            b"Message-ID: <worker-alone@bench.example>\r\n\r\n")
    line = b"La de da de da " * 4 + b"0123456789\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def render_config(shard_port: int, sink_port: int, metrics_port: int, workdir: Path) -> str:
    return "\n".join([
        "[smtp]", 'hostname = "worker-alone.localdomain"', "",
        "[queue]", f'shards = ["tcp://{HOST}:{shard_port}"]', f'spool_dir = "{workdir / "spool"}"', "",
        "[delivery]", f'smarthost = "{HOST}:{sink_port}"', "",
        "[metrics]", f'listen = "{HOST}:{metrics_port}"', "",
    ])


@dataclass
class Run:
    """The scripted shard's state during one run."""

    total: int
    warmup: int
    in_flight: int
    recipients: int
    body: bytes
    worker_pid: int
    sent: int = 0
    done: int = 0
    identity: bytes = b""
    started_cpu: float = 0.0
    started_wall: float = 0.0
    finished_cpu: float = 0.0
    finished_wall: float = 0.0
    bad: list[str] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self) -> Deliver:
        self.sent += 1
        n = self.sent
        recipients = [f"user{n}.{i}@dest{n % 7}.example" for i in range(self.recipients)]
        return Deliver(job_id=f"J{n}", queue_id=f"Q{n:010d}", sender="bench@bench.example", recipients=recipients,
                       domain=f"dest{n % 7}.example", body=self.body, attempt=1, seq=n, epoch=EPOCH, incarnation=1)


async def scripted_shard(socket: zmq.asyncio.Socket, run: Run) -> None:
    """Ack heartbeats, keep `in_flight` Delivers outstanding, count Results until `total` came back."""
    while not run.finished.is_set():
        identity, frame = await socket.recv_multipart()
        message = decode(frame)
        if isinstance(message, Heartbeat):
            ack = HeartbeatAck(shard=0, shard_epoch=EPOCH, incarnation=1, last_seq=run.sent,
                               revoked=list(message.finished), state="serving")
            await socket.send_multipart([identity, ack.encode()])
            if not run.identity:
                run.identity = identity
                for _ in range(min(run.in_flight, run.total)):
                    await socket.send_multipart([identity, run.deliver().encode()])
        elif isinstance(message, Result):
            run.done += 1
            run.bad.extend(f"{o.recipient}: {o.code} {o.text}" for o in message.outcomes
                           if o.kind is not OutcomeKind.DELIVERED)
            if run.done == run.warmup:
                run.started_cpu, run.started_wall = cpu_seconds(run.worker_pid), time.monotonic()
            if run.sent < run.total:
                await socket.send_multipart([identity, run.deliver().encode()])
            if run.done == run.total:
                run.finished_cpu, run.finished_wall = cpu_seconds(run.worker_pid), time.monotonic()
                run.finished.set()


def worker_command(config: Path, profile: str | None, source: str | None = None) -> list[str]:
    me = [sys.executable, "-m", "benchmarks.worker_alone"]
    if profile is not None:
        return [*me, "--profiled-worker", str(config), profile]
    if source is not None:
        return [*me, "--from-source", "serve", "worker", "--config", str(config)]
    return [*mtacluster_command(), "serve", "worker", "--config", str(config)]


def worker_environment(source: str | None) -> dict[str, str]:
    """The worker's environment: this one, plus the checkout to import `cluster` from (`--source`)."""
    environment = dict(os.environ)
    if source is not None:
        environment[SOURCE_VARIABLE] = str(Path(source).resolve())
    return environment


def from_source(argv: list[str]) -> int:
    """`mtacluster ARGV` with `cluster` from $WORKER_ALONE_SOURCE (benchmarks/checkout.py)."""
    checkout.use_source(SOURCE_VARIABLE)
    import cluster
    from cluster.cli import main as cluster_main

    print(f"worker_alone: cluster from {Path(cluster.__file__).parent}", file=sys.stderr, flush=True)
    return cluster_main(argv)


def profiled_worker(config: str, output: str) -> int:
    """`mtacluster serve worker --config CONFIG`, profiled into OUTPUT when it stops (benchmarks/profiled.py)."""
    checkout.use_source(SOURCE_VARIABLE)
    from cluster.cli import main as cluster_main

    return run_profiled(lambda: cluster_main(["serve", "worker", "--config", config]), output)


async def measure(args: argparse.Namespace) -> dict[str, object]:
    shard_port, sink_port, metrics_port = free_ports(3)
    sink = SmtpSink(HOST, sink_port)
    await sink.start()
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(f"tcp://{HOST}:{shard_port}")
    workdir = Path(tempfile.mkdtemp(prefix="worker-alone-"))
    config = workdir / "mtacluster.toml"
    config.write_text(render_config(shard_port, sink_port, metrics_port, workdir))
    log = (workdir / "worker.log").open("wb")
    process = subprocess.Popen(worker_command(config, args.profile, args.source), stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=worker_environment(args.source))
    total = args.warmup + args.messages
    run = Run(total, args.warmup, args.in_flight, args.recipients, message_body(args.size), process.pid)
    shard = asyncio.create_task(scripted_shard(socket, run))
    try:
        try:
            await asyncio.wait_for(asyncio.shield(run.finished.wait()), args.time_limit)
        except TimeoutError:
            raise HarnessError(f"{run.done} of {total} Results by the time limit ({args.time_limit:g}s); "
                               f"worker log: {workdir / 'worker.log'}") from None
        if run.bad:
            raise HarnessError(f"{len(run.bad)} recipients not delivered, e.g. {run.bad[:3]}")
        await sink.wait_for(total, time.monotonic() + 10)
        rss = peak_rss_mib(process.pid)
    finally:
        shard.cancel()
        await asyncio.to_thread(stop_process, process, 30)
        log.close()
        socket.close(linger=0)
        context.term()
        await sink.stop()
    cpu = run.finished_cpu - run.started_cpu
    wall = run.finished_wall - run.started_wall
    return {"messages": args.messages, "recipients": args.recipients, "in_flight": args.in_flight,
            "size": args.size, "cpu_ms_per_message": round(cpu * 1000 / args.messages, 4),
            "wall_seconds": round(wall, 3), "messages_per_second": round(args.messages / wall, 1),
            "peak_rss_mib": round(rss, 1), "load_average": os.getloadavg()[0], "source": args.source or ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages measured (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=200, help="messages before the measurement starts")
    parser.add_argument("--in-flight", type=int, default=4, help="Delivers kept outstanding")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--profile", help="profile the worker into this file: collapsed stacks of a CPU-time "
                        "sampler, or cProfile (CPU clock) when it ends in .prof")
    parser.add_argument("--source", metavar="DIR", help="run the worker with `cluster` from DIR (A/B runs)")
    parser.add_argument("--from-source", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--summarize", metavar="FILE", help="print the top functions of a sampler profile")
    parser.add_argument("--profiled-worker", nargs=2, metavar=("CONFIG", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_source is not None:
        return from_source(args.from_source)
    if args.profiled_worker:
        return profiled_worker(*args.profiled_worker)
    if args.summarize:
        print(summary(args.summarize, top=45))
        return 0
    result = asyncio.run(measure(args))
    print(f"worker CPU {result['cpu_ms_per_message']} ms/message, {result['messages_per_second']} messages/s "
          f"(load {result['load_average']:.1f})", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
