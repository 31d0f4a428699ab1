"""The frontend role alone: its CPU per message against a stub shard that answers Stored at once.

    python -m benchmarks.frontend_alone [--messages 3000] [--size 4] [--sessions 20] [--recipients 1]
                                        [--rounds 3] [--reuse-connections] [--profile FILE.prof]

Starts a stub shard (a ZeroMQ ROUTER in its own process: every Inject gets a Stored, every ping "ready", any
other request an Error) and one `mtacluster serve frontend` pointed at it, waits for the 220 greeting and a
warm-up load, then runs smtp-source (as `make bench` does: every message on its own connection unless
`--reuse-connections`) once per round and reads the frontend's user+system CPU from /proc/PID/stat before and
after. Prints one line per round and the median, then a JSON line. The stub, smtp-source and the frontend share
the machine, but only the frontend's own CPU is counted, so the figure is far steadier than `make bench`'s on a
busy machine. `--profile FILE` runs the frontend under cProfile with a CPU clock (`time.process_time`) and
writes its stats to FILE when it stops (the CPU figure then includes the profiler's overhead; compare profiles
with profiles).

Needs smtp-source (package postfix). Failure modes: a frontend that does not greet within the wait, or
smtp-source failing, raises RuntimeError with the tail of the frontend's log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import checkout
from benchmarks.cluster_instance import cpu_seconds_from_stat, mtacluster_command, stop_process
from benchmarks.ports import HOST, free_ports
from benchmarks.profiled import run_profiled, summary

SENDER = "bench@bench.example"
RECIPIENT = "sink@bench.example"
HELO = "bench.example"
READY_TIMEOUT = 30.0
WARMUP_MESSAGES = 200
SOURCE_VARIABLE = "FRONTEND_ALONE_SOURCE"


def stub_shard(port: int) -> None:
    """Serve the bus on `port` until killed: Stored for every Inject, ready for every ping."""
    import zmq

    from cluster.bus.schemas import AdminReply, AdminRequest, Error, Inject, Stored, decode

    socket_ = zmq.Context.instance().socket(zmq.ROUTER)
    socket_.bind(f"tcp://{HOST}:{port}")
    number = 0
    while True:
        identity, frame = socket_.recv_multipart()
        message = decode(frame)
        if isinstance(message, Inject):
            number += 1
            answer: object = Stored(req=message.req, queue_id=f"stub{number:010d}")
        elif isinstance(message, AdminRequest):
            answer = AdminReply(req=message.req, ok=True, data={"ready": True, "state": "serving"})
        else:
            answer = Error(text=f"stub shard: no {message.TYPE}", req=getattr(message, "req", 0))
        socket_.send_multipart([identity, answer.encode()])  # type: ignore[attr-defined]


def use_source() -> None:
    """Import `cluster` from the directory in $FRONTEND_ALONE_SOURCE, if set (benchmarks/checkout.py)."""
    checkout.use_source(SOURCE_VARIABLE)


def profiled_frontend(config: str, output: str) -> int:
    """`mtacluster serve frontend --config CONFIG` profiled into OUTPUT (benchmarks/profiled.py)."""
    use_source()
    from cluster.cli.common import load
    from cluster.roles import serve

    loaded = load(argparse.Namespace(config=config))
    return run_profiled(lambda: serve("frontend", loaded), output)


def render_config(workdir: Path, smtp_port: int, shard_port: int, metrics_port: int) -> str:
    return "\n".join([
        "[smtp]",
        'hostname = "bench-frontend.localdomain"',
        f'listen = ["{HOST}:{smtp_port}"]',
        "",
        "[queue]",
        f'shards = ["tcp://{HOST}:{shard_port}"]',
        f'spool_dir = "{workdir / "spool"}"',
        "",
        "[metrics]",
        f'listen = "{HOST}:{metrics_port}"',
        "",
    ])


def cpu_seconds(pid: int) -> float:
    return cpu_seconds_from_stat(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def wait_for_greeting(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the frontend exited with {process.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1) as conn:
            if conn.recv(512).startswith(b"220"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"the frontend did not greet within {READY_TIMEOUT:g}s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def smtp_source(binary: str, port: int, messages: int, args: argparse.Namespace) -> None:
    command = [binary, "-s", str(args.sessions), "-m", str(messages), "-l", str(args.size * 1024),
               "-f", SENDER, "-t", RECIPIENT, "-M", HELO]
    if args.recipients > 1:
        command += ["-r", str(args.recipients)]
    if args.reuse_connections:
        command.append("-d")
    subprocess.run([*command, f"{HOST}:{port}"], check=True, stdout=subprocess.DEVNULL)


def run(args: argparse.Namespace) -> dict[str, object]:
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    smtp_port, shard_port, metrics_port = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="frontend-alone-") as tmp:
        workdir = Path(tmp)
        config = workdir / "mtacluster.toml"
        config.write_text(render_config(workdir, smtp_port, shard_port, metrics_port))
        log = workdir / "frontend.log"
        me = [sys.executable, "-m", "benchmarks.frontend_alone"]
        stub = subprocess.Popen([*me, "--stub-shard", str(shard_port)], stdin=subprocess.DEVNULL)
        if args.profile:
            frontend_command = [*me, "--profiled-frontend", str(config), str(Path(args.profile).resolve())]
        else:
            frontend_command = [*mtacluster_command(), "serve", "frontend", "--config", str(config)]
        env = dict(os.environ)
        if args.source:  # another checkout's `cluster` package (e.g. the code before a change) for an A/B run
            env[SOURCE_VARIABLE] = str(Path(args.source).resolve())
            if not args.profile:
                frontend_command = [*me, "--from-source", "serve", "frontend", "--config", str(config)]
        with open(log, "wb") as out:
            frontend = subprocess.Popen(frontend_command, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
        print(f"frontend pid {frontend.pid}", file=sys.stderr)
        try:
            wait_for_greeting(smtp_port, frontend, log)
            smtp_source(binary, smtp_port, WARMUP_MESSAGES, args)
            per_message: list[float] = []
            for round_ in range(1, args.rounds + 1):
                before, started = cpu_seconds(frontend.pid), time.monotonic()
                smtp_source(binary, smtp_port, args.messages, args)
                used, wall = cpu_seconds(frontend.pid) - before, time.monotonic() - started
                per_message.append(used * 1000 / args.messages)
                print(f"round {round_}: frontend CPU {per_message[-1]:.3f} ms/message "
                      f"({used:.2f} s CPU, {wall:.1f} s wall, {args.messages / wall:.0f} messages/s)",
                      file=sys.stderr)
        finally:
            stop_process(frontend, 30)
            stub.kill()
            stub.wait()
        text = tail(log, 10**6)
        accepted = text.count(" accepted trace=")
        source = next((line.rpartition(" ")[2] for line in text.splitlines()
                       if line.startswith("frontend_alone: cluster from ")), "this checkout")
    expected = WARMUP_MESSAGES + args.messages * args.rounds
    if accepted != expected:
        print(f"warning: the frontend logged {accepted} accepted messages, expected {expected}", file=sys.stderr)
    return {"messages": args.messages, "size_kib": args.size, "sessions": args.sessions,
            "recipients": args.recipients, "reuse_connections": args.reuse_connections,
            "cpu_ms_per_message": per_message, "median": statistics.median(per_message),
            "accepted_logged": accepted, "expected": expected, "cluster_from": source}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4, help="message payload in KiB")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reuse-connections", action="store_true", help="smtp-source -d")
    parser.add_argument("--profile", help="profile the frontend into this file: FILE.prof cProfile stats (CPU "
                        "clock), any other name collapsed stacks from a CPU-time sampler")
    parser.add_argument("--source", help="run the frontend from this directory's `cluster` package (A/B runs)")
    parser.add_argument("--from-source", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--stub-shard", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profiled-frontend", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_source is not None:  # `mtacluster ARGS` with `cluster` from $FRONTEND_ALONE_SOURCE
        use_source()
        import cluster
        from cluster.cli import main as mtacluster_main

        print(f"frontend_alone: cluster from {Path(cluster.__file__).parent}", file=sys.stderr, flush=True)
        return mtacluster_main(args.from_source)
    if args.stub_shard:
        stub_shard(args.stub_shard)
        return 0
    if args.profiled_frontend:
        return profiled_frontend(*args.profiled_frontend)
    result = run(args)
    if args.profile and not args.profile.endswith(".prof"):
        print(summary(args.profile))
    print(f"frontend CPU ms/message, median of {args.rounds}: {result['median']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
