"""The outbox of one shard: DSNs stored here that belong to another shard, injected there until it has them.

A DSN goes to the shard that owns the original sender's domain (ARCHITECTURE.md contract 3). When that is
another shard, bounces.py stores the DSN here with `forward_shard` = the owner, in the same transaction as the
failures it reports. `forward_loop` injects each entry into its owner over a DEALER socket (CURVE like every
bus client), resending every `RESEND_AFTER` seconds until the owner answers Stored; only then is the entry
removed from the spool. A resend after a lost answer can make a duplicate DSN, never a lost one.

Inputs: entries (`add`, at start from the spool and whenever a DSN is stored), the spool (`SpoolIO`: bodies,
removal), the configuration (shard endpoints, keys). Outputs: Inject frames to other shards, a log line per
forwarded DSN. Failure modes: an unreachable owner is retried soon; a spool error is logged and retried.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import cast

import zmq
import zmq.asyncio

from cluster.bus.schemas import Inject, InjectRefused, SchemaError, Stored, decode
from cluster.bus.security import cluster_keys, secure_client
from cluster.config import Config
from cluster.queue.records import Message
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO

log = logging.getLogger("mtacluster.queue")

RESEND_AFTER = 10.0
RETRY_UNCONNECTED = 0.5


class Outbox:
    def __init__(self, config: Config, index: int, io: SpoolIO) -> None:
        self.config = config
        self.index = index
        self.io = io
        self.messages: dict[str, Message] = {}

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, message: Message) -> None:
        self.messages[message.queue_id] = message

    async def forward_loop(self, context: zmq.asyncio.Context) -> None:
        """Inject outbox DSNs into the shards owning their recipients' domains, until each is Stored."""
        keys = cluster_keys(self.config.bus)
        sockets: dict[int, zmq.asyncio.Socket] = {}
        poller = zmq.asyncio.Poller()
        sent_at: dict[str, float] = {}
        requests: dict[int, str] = {}
        numbers = itertools.count(1)
        try:
            while True:
                now = time.monotonic()
                due = [m for q, m in self.messages.items() if now - sent_at.get(q, -math.inf) >= RESEND_AFTER]
                try:
                    bodies = await self.io.read_bodies([m.queue_id for m in due]) if due else {}
                except SpoolError as exc:
                    log.error("shard %d: cannot read outbox DSNs: %s", self.index, exc)
                    bodies = {}
                for message in due:
                    body = bodies.get(message.queue_id)
                    if body is None:
                        continue
                    socket = sockets.get(message.forward_shard)
                    if socket is None:
                        socket = sockets[message.forward_shard] = context.socket(zmq.DEALER)
                        socket.setsockopt(zmq.LINGER, 0)
                        socket.setsockopt(zmq.IMMEDIATE, 1)  # refuse to queue while the peer is not connected
                        secure_client(cast("zmq.Socket[bytes]", socket), keys)
                        socket.connect(self.config.queue.shards[message.forward_shard])
                        poller.register(socket, zmq.POLLIN)
                    number = next(numbers)
                    inject = Inject(number, "", [r.address for r in message.recipients], body, message.client)
                    sent_at[message.queue_id] = now
                    try:
                        await socket.send(inject.encode(), flags=zmq.NOBLOCK)
                    except zmq.Again:  # not connected (yet): try again soon
                        sent_at[message.queue_id] = now - RESEND_AFTER + RETRY_UNCONNECTED
                        continue
                    except zmq.ZMQError as exc:
                        log.warning("shard %d: cannot forward DSN %s: %s", self.index, message.queue_id, exc)
                        continue
                    requests[number] = message.queue_id
                for socket, _ in await poller.poll(timeout=500):
                    frames = await socket.recv_multipart()
                    try:
                        reply = decode(frames[-1])
                    except SchemaError:
                        continue
                    if isinstance(reply, Stored | InjectRefused) and reply.req in requests:
                        queue_id = requests.pop(reply.req)
                        if isinstance(reply, Stored) and queue_id in self.messages:
                            await self._forwarded(queue_id, reply.queue_id)
        finally:
            for socket in sockets.values():
                socket.close(linger=0)

    async def _forwarded(self, queue_id: str, remote_queue_id: str) -> None:
        try:
            await self.io.commit(Batch(removals=[queue_id]))
        except SpoolError as exc:
            log.error("shard %d: cannot remove forwarded DSN %s: %s", self.index, queue_id, exc)
            return
        owner = self.messages.pop(queue_id).forward_shard
        log.info("%s: DSN stored by its owner, shard %d, as %s", queue_id, owner, remote_queue_id)
