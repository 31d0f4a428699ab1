"""Hand accepted messages to the queue shards and wait until they are on disk (DESIGN.md contract 1).

`ShardClient.inject()` splits a message's recipients by the shard that owns each recipient's domain
(rendezvous hashing, `cluster.bus.ring`), sends one `Inject` per shard over a ZeroMQ DEALER socket, and waits
for every shard's `Stored`. Only then is the answer 250. A refusal from a shard (`InjectRefused`, e.g.
452 4.3.1 disk full) is passed on; a timeout or an unreachable shard gives 451 4.3.0 and the client retries.
If one shard stored its part and another did not, the client's retry stores that part again: a duplicate, not
a loss (the contract allows duplicates, never losses).

Readiness: each shard is pinged every second; `all_reachable()` is true when every shard answered within the
last few seconds and said it is ready.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence

import zmq
import zmq.asyncio

from cluster.bus.ring import shard_for_address
from cluster.bus.schemas import (
    AdminReply,
    AdminRequest,
    Error,
    Inject,
    InjectRefused,
    SchemaError,
    Stored,
    decode,
)
from cluster.bus.security import CurveKeys, secure_client
from cluster.frontend import metrics
from cluster.smtp.reply import Reply

log = logging.getLogger(__name__)

QUEUE_UNAVAILABLE = Reply.of(451, "4.3.0", "Temporary queue failure, please try again later")
PING_INTERVAL = 1.0
REACHABLE_WITHIN = 5.0


class _ShardLink:
    """One DEALER socket to one shard, with the requests waiting for its answers."""

    def __init__(self, context: zmq.asyncio.Context, index: int, endpoint: str, keys: CurveKeys | None) -> None:
        self.index = index
        self.socket = context.socket(zmq.DEALER)
        secure_client(self.socket, keys)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Queue messages only on completed connections: a shard that is down fails fast instead of receiving a
        # backlog (that the client will retry anyway) when it comes back.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.connect(endpoint)
        self.pending: dict[int, asyncio.Future[Stored | InjectRefused | AdminReply | Error]] = {}
        self.last_answer = 0.0
        self.ready = False

    async def receive_forever(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            self.last_answer = time.monotonic()
            try:
                message = decode(frames[-1])
            except SchemaError as exc:
                log.warning("shard %d sent an undecodable frame: %s", self.index, exc)
                continue
            req = getattr(message, "req", None)
            future = self.pending.pop(req, None) if isinstance(req, int) else None
            if future is not None and not future.done() and isinstance(
                    message, Stored | InjectRefused | AdminReply | Error):
                future.set_result(message)


class ShardClient:
    def __init__(self, shards: Sequence[str], timeout: float, keys: CurveKeys | None = None) -> None:
        self.shards = list(shards)
        self.timeout = timeout
        self.context = zmq.asyncio.Context.instance()
        self.links = [_ShardLink(self.context, i, endpoint, keys) for i, endpoint in enumerate(self.shards)]
        self._requests = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for link in self.links:
            self._tasks.append(asyncio.create_task(link.receive_forever()))
            self._tasks.append(asyncio.create_task(self._ping_forever(link)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links:
            link.socket.close(linger=0)

    def all_reachable(self) -> bool:
        now = time.monotonic()
        reachable = sum(1 for link in self.links if link.ready and now - link.last_answer < REACHABLE_WITHIN)
        metrics.SHARDS_REACHABLE.set(reachable)
        return reachable == len(self.links)

    async def _ping_forever(self, link: _ShardLink) -> None:
        while True:
            req = next(self._requests)
            future: asyncio.Future[Stored | InjectRefused | AdminReply | Error] = (
                asyncio.get_running_loop().create_future())
            link.pending[req] = future
            try:
                await link.socket.send(AdminRequest(req=req, op="ping").encode(), flags=zmq.NOBLOCK)
                answer = await asyncio.wait_for(future, PING_INTERVAL * 2)
                # A shard still recovering its spool answers, but is not ready to store mail yet.
                if isinstance(answer, AdminReply) and answer.ok and isinstance(answer.data, dict):
                    link.ready = bool(answer.data.get("ready"))
            except (TimeoutError, zmq.Again):
                pass
            finally:
                link.pending.pop(req, None)
            await asyncio.sleep(PING_INTERVAL)

    async def _inject_one(self, link: _ShardLink, sender: str, recipients: list[str], body: bytes,
                          client: dict[str, str]) -> Stored | InjectRefused | None:
        req = next(self._requests)
        future: asyncio.Future[Stored | InjectRefused | AdminReply | Error] = (
            asyncio.get_running_loop().create_future())
        link.pending[req] = future
        started = time.perf_counter()
        try:
            frame = Inject(req=req, sender=sender, recipients=recipients, body=body, client=client).encode()
            async with asyncio.timeout(self.timeout):
                await link.socket.send(frame, copy=False)
                answer = await future
        except TimeoutError:
            log.warning("shard %d did not store a message within %.1fs", link.index, self.timeout)
            return None
        finally:
            link.pending.pop(req, None)
        if isinstance(answer, Stored | InjectRefused):
            metrics.INJECT_DURATION.labels(shard=str(link.index)).observe(time.perf_counter() - started)
            return answer
        log.warning("shard %d answered an inject with %r", link.index, answer)
        return None

    async def inject(self, sender: str, recipients: Sequence[str], body: bytes,
                     client: dict[str, str]) -> tuple[Reply, list[str]]:
        """Store one message on every shard that owns some of its recipients: (reply for the client, queue ids)."""
        parts: dict[int, list[str]] = {}
        for recipient in recipients:
            parts.setdefault(shard_for_address(recipient, self.shards), []).append(recipient)
        answers = await asyncio.gather(*(
            self._inject_one(self.links[index], sender, part, body, client) for index, part in parts.items()))
        refusals = [a for a in answers if isinstance(a, InjectRefused)]
        if refusals:
            worst = max(refusals, key=lambda r: r.code)
            return Reply.of(worst.code, worst.enhanced, worst.text), []
        if any(a is None for a in answers):
            return QUEUE_UNAVAILABLE, []
        queue_ids = [a.queue_id for a in answers if isinstance(a, Stored)]
        return Reply.of(250, "2.0.0", f"Ok: queued as {' '.join(queue_ids)}"), queue_ids
