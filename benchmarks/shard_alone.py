"""The queue shard alone: a real `mtacluster serve queue` fed over ZeroMQ by a scripted frontend and scripted
workers, and the shard process's CPU per message.

```
.venv/bin/python -m benchmarks.shard_alone --messages 3000            # 20 injects in flight, 2 workers
.venv/bin/python -m benchmarks.shard_alone --messages 3000 --profile /tmp/shard.txt   # + py-spy, raw stacks
```

The frontend keeps `--in-flight` Injects of `--size` bytes open (one recipient each, over `--domains`
domains), sending the next as each Stored comes back; each worker heartbeats every `queue.heartbeat_interval`
(through the real `ShardSession`, so credits, seq and revocations are the protocol's) and answers every Deliver
with a delivered Result as soon as it is read, all those read in one turn together. The shard's CPU (user +
system of the whole process, from /proc/PID/stat) is counted from the first Inject until every message was
Stored and every job's Result sent and the shard has gone quiet. Printed: messages stored, recipients delivered
(a Deliver for a job a worker already holds is not counted twice), wall seconds, shard CPU ms per message (and
its system part), spool transactions per message (from the shard's /metrics), and the time from sending an
Inject to reading its Stored (p50, p99: the shard's share of the accept latency, fsync included); the last line
is a JSON object.

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
from benchmarks.ports import free_ports
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
    work = Path(tempfile.mkdtemp(prefix="shard-alone-"))
    shard_port, metrics_port = free_ports(2)
    config = work / "mtacluster.toml"
    config.write_text(render_config(work, shard_port, metrics_port))
    log_path = work / "shard.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*mtacluster_command(), "serve", "queue", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
        sent = stored = refused = 0
        req = 0
        sent_at: dict[int, float] = {}
        latencies: list[float] = []

        def inject() -> None:
            nonlocal sent, req
            req += 1
            sent_at[req] = time.monotonic()
            frontend.send(Inject(req, "sender@bench.example", [f"user{sent}@{domains[sent % len(domains)]}"],
                                 body, {"client_address": "127.0.0.1", "helo": "bench"}).encode())
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
            done = stored + refused >= args.messages and sum(w.results for w in workers) >= stored
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
        totals = sum_by_name(scrape("127.0.0.1", metrics_port))
        transactions = totals.get("mtacluster_queue_spool_commit_duration_seconds_count", 0.0)
        return {"messages": float(stored), "refused": float(refused),
                "delivered": float(sum(w.results for w in workers)), "wall_seconds": round(elapsed, 2),
                "cpu_ms_per_message": round(1000 * cpu / max(1, stored), 3),
                "system_ms_per_message": round(1000 * system / max(1, stored), 3),
                "transactions_per_message": round(transactions / max(1, stored), 3),
                "stored_p50_ms": round(1000 * (percentile(latencies, 0.5) or 0.0), 2),
                "stored_p99_ms": round(1000 * (percentile(latencies, 0.99) or 0.0), 2)}
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
    args = parser.parse_args(argv)
    figures = run(args)
    for name, value in figures.items():
        print(f"{name:>26}: {value}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
