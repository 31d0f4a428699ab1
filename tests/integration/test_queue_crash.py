"""kill -9 of a shard process: every message it answered Stored for comes back, in-flight work is re-queued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from cluster.bus.schemas import BusMessage, Deliver, Heartbeat, Inject, Outcome, Result, Stored, decode
from tests.support.harness import REPO, wait_for
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

LAUNCH = """
import asyncio, logging, sys
from cluster.config import load_config
from cluster.queue.shard import Shard
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
async def main():
    shard = Shard(load_config(sys.argv[1], environ={}), 0)
    stop = asyncio.Event()
    task = asyncio.create_task(shard.run(stop))
    while not shard.is_ready():
        if task.done():
            await task
        await asyncio.sleep(0.01)
    print("READY", flush=True)
    await task
asyncio.run(main())
"""


class ShardProcess:
    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-c", LAUNCH, str(self.config_path)], cwd=REPO,
                                            stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "READY", f"shard did not start: {self.log_path.read_text()}"

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def receive(socket: zmq.Socket[bytes], timeout: float) -> BusMessage | None:
    if not socket.poll(int(timeout * 1000)):
        return None
    return decode(socket.recv_multipart()[-1])


def test_kill_9_loses_no_stored_message(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config_path = tmp_path / "shard.toml"
    config_path.write_text(f'[queue]\nshards = ["{endpoint}"]\nspool_dir = "{tmp_path / "spool"}"\n'
                           'min_free_space = 0\nheartbeat_interval = 0.1\nworker_timeout = 1\n'
                           '[metrics]\nlisten = ""\n')
    shard = ShardProcess(config_path, tmp_path / "shard.log")
    context = zmq.Context()
    frontend = context.socket(zmq.DEALER)
    worker = context.socket(zmq.DEALER)
    for socket in (frontend, worker):
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
    try:
        shard.start()
        # Pipeline 300 injects without waiting, then kill the shard while it is still answering.
        total = 300
        for req in range(total):
            frontend.send(Inject(req, "s@sender.test", [f"r{req}@dom{req % 7}.test"], b"Subject: x\r\n\r\nbody\r\n"
                                 ).encode())
        stored: set[str] = set()
        while len(stored) < 100:
            reply = receive(frontend, 10)
            assert isinstance(reply, Stored), reply
            stored.add(reply.queue_id)
        worker.send(Heartbeat("w", 20, []).encode())
        wait_for(lambda: isinstance(receive(worker, 0.2), Deliver), 10, "a first Deliver")
        shard.kill9()
        while (reply := receive(frontend, 0.05)) is not None:
            if isinstance(reply, Stored):
                stored.add(reply.queue_id)

        shard.start()
        delivered: set[str] = set()
        worker.send(Heartbeat("w-after", 1000, []).encode())
        deadline = time.monotonic() + 20
        while not stored <= delivered and time.monotonic() < deadline:
            message = receive(worker, 0.5)
            if isinstance(message, Deliver):
                delivered.add(message.queue_id)
                worker.send(Result(message.job_id, "w-after", [
                    Outcome(r, "delivered", 250, "2.0.0", "ok") for r in message.recipients]).encode())
        missing = stored - delivered
        assert not missing, f"{len(missing)} stored messages lost after kill -9"
        assert "may be delivered twice" in (tmp_path / "shard.log").read_text()
    finally:
        shard.stop()
        frontend.close(0)
        worker.close(0)
        context.term()
