"""The queue shard alone: a real `mtacluster serve queue` fed over ZeroMQ by a scripted frontend and scripted
workers, and the shard process's CPU per message.

```
.venv/bin/python -m benchmarks.shard_alone --messages 3000            # 20 injects in flight, 2 workers
.venv/bin/python -m benchmarks.shard_alone --messages 3000 --profile /tmp/shard.txt   # + py-spy, raw stacks
.venv/bin/python -m benchmarks.shard_alone --messages 3000 --cpu-profile /tmp/shard.prof  # cProfile, CPU clock
.venv/bin/python -m benchmarks.shard_alone --messages 300 --recipients 100           # bulk: 100 per message
.venv/bin/python -m benchmarks.shard_alone --messages 3000 --source /tmp/before      # A/B: another `cluster`
```

The frontend keeps `--in-flight` Injects of `--size` bytes open (`--recipients` each, 1 by default, over `--domains`
domains), sending the next as each Stored comes back; each worker heartbeats every `queue.heartbeat_interval`
(through the real `ShardSession`, so credits, seq and revocations are the protocol's) and answers every Deliver with
a delivered Result as soon as it is read, all those read in one turn together. The shard's CPU (user + system of the
whole process, from /proc/PID/stat) is counted from the first Inject until every message was Stored and every job's
Result sent and the shard has gone quiet. Printed: messages stored, recipients delivered (a Deliver for a job a
worker already holds is not counted twice), wall seconds, shard CPU ms per message (and its system part), spool
transactions per message (from the shard's /metrics), and the time from sending an Inject to reading its Stored
(p50, p99: the shard's share of the accept latency, fsync included), and the CPU per message of each of its threads
(main: the event loop; the other Python threads, named after the process: the spool's fsyncs and reads, checkpoints;
ZMQbg: ZeroMQ's I/O); the last line is a JSON object. `--cpu-profile FILE` runs the shard under
benchmarks/profiled.py (FILE.prof: cProfile on a CPU clock; another name: collapsed stacks of a CPU-time sampler;
the CPU figure then includes the profiler), and `--source DIR` runs it with the `cluster` package of DIR (e.g. `git
archive` of the code before a change).

Failure modes: the shard not ready within READY_TIMEOUT, or the run not finished within `--time-limit`,
raises SystemExit with the tail of the shard's log; the shard is always stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from benchmarks.cluster_instance import mtacluster_command, stop_process
from benchmarks.cluster_metrics import scrape, sum_by_name
from benchmarks.frontend_alone import SOURCE_VARIABLE, use_source
from benchmarks.ports import free_ports
from benchmarks.profiled import run_profiled, summary
from benchmarks.stats import percentile
from cluster.bus.schemas import (
    Deliver,
    HeartbeatAck,
    Inject,
    InjectRefused,
    Outcome,
    OutcomeKind,
    Result,
    Stored,
    decode,
)
from cluster.delivery.shard_session import ShardSession

READY_TIMEOUT = 30.0
HEARTBEAT_INTERVAL = 1.0
QUIET = 0.3  # seconds without a frame after the last Result: the shard has finished its work
_TICKS = os.sysconf("SC_CLK_TCK")


def shard_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of the process, summed by the threads' names in /proc (the main
    thread is "main"; ZeroMQ names its own, "ZMQbg/IO/0"; Python's other threads have the process's name)."""
    threads: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        threads[name] = threads.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICKS
    return threads


def render_config(work: Path, shard_port: int, metrics_port: int) -> str:
    return "\n".join([
        "[queue]",
        f'shards = ["tcp://127.0.0.1:{shard_port}"]',
        f'spool_dir = "{work / "spool"}"',
        f"heartbeat_interval = {HEARTBEAT_INTERVAL}",
        "",
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
        "",
    ])


class ScriptedWorker:
    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, name: str, concurrency: int) -> None:
        self.name = name
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.session = ShardSession(concurrency, fence_after=30.0)
        self.results = 0
        self.last_heartbeat = 0.0

    def heartbeat(self, now: float) -> None:
        self.socket.send(self.session.heartbeat(self.name, now).encode())
        self.last_heartbeat = now

    def on_frames(self, frames: list[bytes], now: float) -> None:
        finished: list[Deliver] = []
        for frame in frames:
            message = decode(frame)
            if isinstance(message, HeartbeatAck):
                self.session.on_ack(message, now)
            elif isinstance(message, Deliver) and self.session.accept(message):
                finished.append(message)
        for deliver in finished:
            if not self.session.start(deliver.job_id):
                continue
            result = Result(deliver.job_id, self.name, [
                Outcome(r, OutcomeKind.DELIVERED, 250, "2.0.0", "Ok: queued as 1234", "sink[127.0.0.1]", 25,
                        0.001, 0.001) for r in deliver.recipients]).encode()
            self.session.finish(deliver.job_id, result)
            self.socket.send(result)
            self.results += len(deliver.recipients)


def read_all(socket: zmq.Socket[bytes]) -> list[bytes]:
    frames = []
    while True:
        try:
            frames.append(socket.recv(zmq.NOBLOCK))
        except zmq.Again:
            return frames


def run(args: argparse.Namespace) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="shard-alone-", dir=args.workdir or None))
    shard_port, metrics_port = free_ports(2)
    config = work / "mtacluster.toml"
    config.write_text(render_config(work, shard_port, metrics_port))
    log_path = work / "shard.log"
    command = [*mtacluster_command(), "serve", "queue", "--config", str(config)]
    env = dict(os.environ)
    if args.cpu_profile or args.source:
        command = [sys.executable, "-m", "benchmarks.shard_alone", "--serve-shard", str(config),
                   str(Path(args.cpu_profile).resolve()) if args.cpu_profile else ""]
    if args.source:
        env[SOURCE_VARIABLE] = str(Path(args.source).resolve())
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    profiler: subprocess.Popen[bytes] | None = None
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        endpoint = f"tcp://127.0.0.1:{shard_port}"
        deadline = time.monotonic() + READY_TIMEOUT
        while b"ready" not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the shard did not become ready:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        workers = [ScriptedWorker(context, endpoint, f"bench-worker-{i}", args.concurrency)
                   for i in range(args.workers)]
        frontend = context.socket(zmq.DEALER)
        frontend.setsockopt(zmq.LINGER, 0)
        frontend.connect(endpoint)
        poller = zmq.Poller()
        for worker in workers:
            poller.register(worker.socket, zmq.POLLIN)
        poller.register(frontend, zmq.POLLIN)
        now = time.monotonic()
        for worker in workers:
            worker.heartbeat(now)
        time.sleep(0.5)
        for worker in workers:
            worker.on_frames(read_all(worker.socket), time.monotonic())
        body = (b"Subject: shard alone\r\n\r\n" + b"x" * 76 + b"\r\n") * (args.size // 78 + 1)
        body = body[:args.size]
        domains = [f"dest{i}.example" for i in range(args.domains)]
        if args.profile:
            profiler = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(process.pid), "--rate",
                 "500", "--gil", "--nonblocking", "--format", "raw", "--output", args.profile],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        cpu_start, started = shard_cpu_seconds(process.pid), time.monotonic()
        threads_start = thread_cpu_seconds(process.pid)
        sent = stored = refused = 0
        req = 0
        sent_at: dict[int, float] = {}
        latencies: list[float] = []

        def inject() -> None:
            nonlocal sent, req
            req += 1
            sent_at[req] = time.monotonic()
            domain = domains[sent % len(domains)]
            recipients = [f"user{sent}.{i}@{domain}" for i in range(args.recipients)]
            frontend.send(Inject(req, "sender@bench.example", recipients, body,
                                 {"client_address": "127.0.0.1", "helo": "bench"}).encode())
            sent += 1

        def may_send() -> bool:
            return (sent < args.messages and sent - stored - refused < args.in_flight
                    and (not args.rate or sent < (time.monotonic() - started) * args.rate + 1))

        while may_send():
            inject()
        last_frame = time.monotonic()
        limit = started + args.time_limit
        while True:
            now = time.monotonic()
            if now > limit:
                raise SystemExit(f"not finished in {args.time_limit}s: stored {stored}, results "
                                 f"{sum(w.results for w in workers)}\n{log_path.read_text()[-3000:]}")
            done = (stored + refused >= args.messages
                    and sum(w.results for w in workers) >= stored * args.recipients)
            if done and now - last_frame >= QUIET:
                break
            for worker in workers:
                if now - worker.last_heartbeat >= HEARTBEAT_INTERVAL:
                    worker.heartbeat(now)
            while may_send():
                inject()
            events = dict(poller.poll(1 if args.rate else 50))
            now = time.monotonic()
            if events:
                last_frame = now
            if frontend in events:
                for frame in read_all(frontend):
                    answer = decode(frame)
                    if isinstance(answer, Stored):
                        stored += 1
                        latencies.append(now - sent_at.pop(answer.req, now))
                    elif isinstance(answer, InjectRefused):
                        refused += 1
                    else:
                        raise SystemExit(f"unexpected answer to an inject: {answer}")
            for worker in workers:
                if worker.socket in events:
                    worker.on_frames(read_all(worker.socket), now)
        elapsed = time.monotonic() - started - QUIET
        user, system = (end - start for end, start in zip(shard_cpu_seconds(process.pid), cpu_start, strict=True))
        cpu = user + system
        threads = thread_cpu_seconds(process.pid)
        per_thread = {f"thread_{name}_ms_per_message": round(1000 * (used - threads_start.get(name, 0.0))
                                                             / max(1, stored), 3)
                      for name, used in sorted(threads.items())}
        totals = sum_by_name(scrape("127.0.0.1", metrics_port))
        transactions = totals.get("mtacluster_queue_spool_commit_duration_seconds_count", 0.0)
        return {"messages": float(stored), "refused": float(refused),
                "delivered": float(sum(w.results for w in workers)), "wall_seconds": round(elapsed, 2),
                "cpu_ms_per_message": round(1000 * cpu / max(1, stored), 3),
                "system_ms_per_message": round(1000 * system / max(1, stored), 3),
                "transactions_per_message": round(transactions / max(1, stored), 3),
                "stored_p50_ms": round(1000 * (percentile(latencies, 0.5) or 0.0), 2),
                "stored_p99_ms": round(1000 * (percentile(latencies, 0.99) or 0.0), 2), **per_thread}
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        stop_process(process, 15)
        context.destroy(linger=0)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            print(f"work directory kept: {work}", file=sys.stderr)


def serve_shard(config: str, output: str) -> int:
    """`mtacluster serve queue --config CONFIG`, with `cluster` from $FRONTEND_ALONE_SOURCE when set, profiled
    into OUTPUT when one is given (benchmarks/profiled.py)."""
    use_source()
    import cluster
    from cluster.cli import main as mtacluster_main

    print(f"shard_alone: cluster from {Path(cluster.__file__).parent}", file=sys.stderr, flush=True)
    arguments = ["serve", "queue", "--config", config]
    if not output:
        return mtacluster_main(arguments)
    return run_profiled(lambda: mtacluster_main(arguments), output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--in-flight", type=int, default=20, help="Injects open at once (smtp-source sessions)")
    parser.add_argument("--rate", type=float, default=0.0, help="at most this many Injects per second (0 = no limit)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100, help="each worker's free slots")
    parser.add_argument("--domains", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--profile", default="", help="record py-spy raw stacks of the shard into this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (spool, log)")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message")
    parser.add_argument("--workdir", default="", help="make the spool under this directory (e.g. /dev/shm: an fsync "
                        "that costs nothing, as on a quiet fast disk, and no noise from other disk users)")
    parser.add_argument("--cpu-profile", default="", help="profile the shard on its CPU clock into this file "
                        "(FILE.prof: cProfile; another name: collapsed stacks of a CPU-time sampler)")
    parser.add_argument("--source", default="", help="run the shard from this directory's `cluster` package")
    parser.add_argument("--serve-shard", nargs=2, metavar=("CONFIG", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_shard:
        return serve_shard(*args.serve_shard)
    figures = run(args)
    if args.cpu_profile and not args.cpu_profile.endswith(".prof"):
        print(summary(args.cpu_profile))
    for name, value in figures.items():
        print(f"{name:>26}: {value}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
