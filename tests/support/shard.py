"""A queue shard run inside the test's event loop, and a bus client that talks to it over real ZeroMQ sockets.

`shard_config` builds a fast-ticking queue config on free ports; `RunningShard` starts `Shard.run` as a task and
waits for readiness; `BusClient` is a DEALER socket sending and decoding the real bus schemas, playing a frontend,
a worker or the admin CLI; `inject` sends one Inject and returns the Stored or InjectRefused answer; `until` is the
asyncio form of `harness.wait_for`. Failures are AssertionErrors that say what did not happen in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from cluster.bus.schemas import BusMessage, Inject, InjectRefused, Stored, decode
from cluster.config import Config, config_from_dict
from cluster.queue.shard import Shard
from tests.support.tooling import free_port


def shard_config(spool: Path, shards: int = 1, **queue: Any) -> Config:
    settings: dict[str, Any] = {"shards": [f"tcp://127.0.0.1:{free_port()}" for _ in range(shards)],
                                "spool_dir": str(spool),
                                "min_free_space": 0, "heartbeat_interval": 0.1, "worker_timeout": 1,
                                "retry_first": 30, "retry_max": 60, **queue}
    return config_from_dict({"queue": settings, "metrics": {"listen": ""}}, environ={})


async def until(condition: Callable[[], Any], timeout: float = 10, what: str = "a condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return value


class BusClient:
    """A DEALER socket speaking the bus schemas, like a frontend, worker or the admin CLI."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    async def send(self, message: BusMessage) -> None:
        await self.socket.send(message.encode())

    async def send_raw(self, frame: bytes) -> None:
        await self.socket.send(frame)

    async def recv(self, timeout: float = 10) -> BusMessage:
        if not await self.socket.poll(int(timeout * 1000)):
            raise AssertionError("no message from the shard in time")
        frames = await self.socket.recv_multipart()
        return decode(frames[-1])

    async def recv_type(self, kind: type[BusMessage], timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(deadline - time.monotonic(), 0.01))
            if isinstance(message, kind):
                return message

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


class RunningShard:
    def __init__(self, config: Config, index: int = 0) -> None:
        self.config = config
        self.index = index
        self.shard = Shard(config, index)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.clients: list[BusClient] = []

    @property
    def endpoint(self) -> str:
        return self.config.queue.shards[self.index]

    async def start(self, loaded: bool = True) -> RunningShard:
        """Run the shard until it is ready and (unless `loaded=False`) its whole queue is read (core.py)."""
        task = self.task = asyncio.create_task(self.shard.run(self.stop))
        await until(lambda: self.shard.is_ready() or task.done(), what="the shard to be ready")
        assert self.shard.is_ready()
        if loaded:
            await until(lambda: self.shard.core.loaded.is_set() or task.done(), what="the queue to be loaded")
            assert self.shard.core.loaded.is_set()
        return self

    def client(self) -> BusClient:
        client = BusClient(self.endpoint)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        self.stop.set()
        if self.task is not None:
            await self.task


async def inject(client: BusClient, req: int, sender: str, recipients: list[str], body: bytes) -> Any:
    """Inject one message; returns the Stored or InjectRefused answer."""
    await client.send(Inject(req, sender, recipients, body, {"client": "192.0.2.1"}))
    reply = await client.recv()
    assert isinstance(reply, Stored | InjectRefused) and reply.req == req
    return reply


BODY = b"From: a@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"
