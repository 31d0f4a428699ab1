"""How many queued messages one shard holds, in how much memory, and how fast it is ready after a restart.

    .venv/bin/python -m benchmarks.spool_scale --messages 1000000            # the issue 11 target run
    .venv/bin/python -m benchmarks.spool_scale --messages 200 --size 256     # the smoke test's run

1. Generate: writes `--messages` messages of `--size` bytes (one recipient each, spread over `--domains`
   destination domains) straight into a fresh SQLite spool through the `Spool` interface, `--batch` messages
   per transaction (what a shard's group commit would write, without the SMTP and bus around it).
2. Start: runs `python -m cluster serve queue` on that spool and measures the time from the process start to its
   "ready" line (serving: it takes new mail and dispatches while the queue is read in the background) and to
   its "queue loaded" line (every queued message scheduled), the CPU time it used until each (/proc/PID/stat:
   on a shared machine the wall time depends on what else runs), then its resident memory once loaded (VmRSS,
   and the peak VmHWM, from /proc/PID/status), and the load average of the machine during the run. Right after
   the ready line a probe shows the shard serving while its queue is read: it injects one message (seconds to
   its Stored) and asks for one job as a worker (seconds to the Deliver), both over the bus like a frontend and
   a worker.
3. kill -9, start again on the same spool and measure again (recovery after a crash).
4. Reports the spool's size on disk (database + WAL) against the message bytes.

Output: one line per measurement and a JSON summary on the last line. Failure modes: a shard that is not ready
within `--time-limit` seconds is killed and the script exits 1. The spool lives under `--dir` (a temporary
directory by default, removed at the end unless `--keep`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from cluster.bus.schemas import BusMessage, Deliver, Heartbeat, Inject, Stored, decode
from cluster.queue.records import Message, QueueIdFactory, Recipient
from cluster.queue.spool import Batch, SqliteSpool

REPO = Path(__file__).resolve().parent.parent


def body_of(number: int, size: int) -> bytes:
    header = (f"From: bench@bench.example\r\nTo: user{number}@dest.example\r\nSubject: message {number}\r\n"
              f"Message-ID: <{number}@bench.example>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n"
    filler = line * (max(0, size - len(header)) // len(line) + 1)
    return header + filler[:max(0, size - len(header))]


def generate(directory: Path, messages: int, size: int, domains: int, batch_size: int) -> float:
    """Write `messages` queued messages into a fresh spool; returns the seconds it took."""
    started = time.monotonic()
    spool = SqliteSpool(directory)
    spool.open()
    ids = QueueIdFactory(0)
    arrival = time.time()
    client = {"ip": "192.0.2.1", "helo": "client.bench.example", "proto": "ESMTP"}
    written = 0
    try:
        while written < messages:
            batch = Batch()
            for number in range(written, min(messages, written + batch_size)):
                message = Message(ids.new(arrival), "bench@bench.example", arrival,
                                  [Recipient(0, f"user{number}@d{number % domains}.example")], size, dict(client))
                batch.add_message(message, body_of(number, size))
            spool.commit(batch)
            written += len(batch.stores)
    finally:
        spool.close()
    return time.monotonic() - started


def probe(endpoint: str, began: float, time_limit: float) -> tuple[float, float]:
    """Inject one message as a frontend would, then ask for one job as a worker would; returns the seconds
    from `began` (monotonic) to the Stored and to the Deliver."""
    context = zmq.Context()
    try:
        def ask(message: BusMessage, wanted: type[BusMessage]) -> float:
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
            socket.send(message.encode())
            while socket.poll(int(max(0.0, began + time_limit - time.monotonic()) * 1000)):
                if isinstance(decode(socket.recv_multipart()[-1]), wanted):
                    return time.monotonic() - began
            raise SystemExit(f"no {wanted.TYPE} from the shard within {time_limit:g}s")

        stored = ask(Inject(1, "probe@bench.example", ["probe@probe.example"], body_of(0, 2048)), Stored)
        delivered = ask(Heartbeat("probe-worker", 1, []), Deliver)
        return stored, delivered
    finally:
        context.destroy(linger=0)


def write_config(path: Path, spool_dir: Path, port: int) -> None:
    path.write_text(f'[queue]\nshards = ["tcp://127.0.0.1:{port}"]\nspool_dir = "{spool_dir}"\nmin_free_space = 0\n'
                    f'[metrics]\nlisten = ""\n')


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0]) * 1024
    return figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Started:
    """A shard process being started, and what its output said so far."""

    def __init__(self, config: Path) -> None:
        self.began = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "cluster", "serve", "queue", "--config", str(config)],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), False)
        self.seen = b""

    def wait_for(self, marker: bytes, time_limit: float) -> tuple[float, float]:
        """Wait until the output shows `marker`; returns (seconds since the start, CPU seconds used by then)."""
        assert self.process.stdout is not None
        while time.monotonic() - self.began < time_limit:
            self.seen += self.process.stdout.read() or b""
            if marker in self.seen:
                return time.monotonic() - self.began, cpu_seconds(self.process.pid)
            if self.process.poll() is not None:
                raise SystemExit(f"the shard exited with {self.process.returncode}:\n"
                                 f"{self.seen.decode(errors='replace')}")
            time.sleep(0.02)
        self.process.kill()
        self.process.wait()
        raise SystemExit(f"no {marker.decode()!r} within {time_limit:g}s:\n"
                         f"{self.seen.decode(errors='replace')[-2000:]}")


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("spool.sqlite3*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes (default 2048)")
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=10_000, help="messages per spool transaction")
    parser.add_argument("--dir", type=Path, default=None, help="where the spool goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the spool afterwards")
    parser.add_argument("--reuse", action="store_true", help="use the spool already in --dir (no generation)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds a shard may take to be ready")
    args = parser.parse_args(argv)

    base = args.dir or Path(tempfile.mkdtemp(prefix="spool-scale-"))
    spool_dir = base / "shard-0"
    summary: dict[str, float | int] = {"messages": args.messages, "size": args.size}
    try:
        if not args.reuse:
            shutil.rmtree(spool_dir, ignore_errors=True)
            seconds = generate(spool_dir, args.messages, args.size, args.domains, args.batch)
            print(f"generated {args.messages} messages of {args.size} B in {seconds:.1f}s", flush=True)
            summary["generate_seconds"] = round(seconds, 2)
        on_disk = disk_bytes(spool_dir)
        summary["disk_bytes"] = on_disk
        summary["disk_ratio"] = round(on_disk / max(1, args.messages * args.size), 3)
        print(f"spool on disk: {on_disk / 2**20:.1f} MiB ({summary['disk_ratio']}x the message bytes)", flush=True)
        config = base / "mtacluster.toml"
        port = free_port()
        write_config(config, base, port)
        for run in ("start", "after_kill9"):
            load_before = os.getloadavg()[0]
            shard = Started(config)
            ready, ready_cpu = shard.wait_for(b"mtacluster: ready role=queue", args.time_limit)
            stored, delivered = probe(f"tcp://127.0.0.1:{port}", shard.began, args.time_limit)
            loaded, loaded_cpu = shard.wait_for(b"queue loaded:", args.time_limit)
            memory = memory_of(shard.process.pid)
            summary[f"{run}_ready_seconds"] = round(ready, 2)
            summary[f"{run}_ready_cpu_seconds"] = round(ready_cpu, 2)
            summary[f"{run}_first_stored_seconds"] = round(stored, 2)
            summary[f"{run}_first_deliver_seconds"] = round(delivered, 2)
            summary[f"{run}_loaded_seconds"] = round(loaded, 2)
            summary[f"{run}_loaded_cpu_seconds"] = round(loaded_cpu, 2)
            summary[f"{run}_rss_bytes"] = memory["VmRSS"]
            summary[f"{run}_peak_rss_bytes"] = memory["VmHWM"]
            summary[f"{run}_rss_per_message"] = round(memory["VmRSS"] / max(1, args.messages), 1)
            summary[f"{run}_load_average"] = round(max(load_before, os.getloadavg()[0]), 1)
            print(f"{run}: ready in {ready:.2f}s ({ready_cpu:.2f}s CPU; a new message stored at {stored:.2f}s, a job "
                  f"handed to a worker at {delivered:.2f}s), whole queue loaded in {loaded:.2f}s "
                  f"({loaded_cpu:.2f}s CPU), RSS {memory['VmRSS'] / 2**20:.1f} MiB (peak "
                  f"{memory['VmHWM'] / 2**20:.1f} MiB, {summary[f'{run}_rss_per_message']} B/message), load "
                  f"average {summary[f'{run}_load_average']}", flush=True)
            shard.process.send_signal(signal.SIGKILL)
            shard.process.wait()
        print(json.dumps(summary), flush=True)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
