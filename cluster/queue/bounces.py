"""Bounces and delay warnings of one shard: which DSN to make, where it is stored, and the outbox.

A DSN (dsn.py) goes from the null sender to the original sender, into the shard that owns the sender's
domain (DESIGN.md contract 3, `shard_for_address`). It is created in the same spool transaction that records
the failures it reports, so a crash can lose neither:
- when this shard owns the sender's domain, the DSN is stored as an ordinary local message;
- otherwise it is stored here as an outbox entry (`forward_shard` = the owner) and `forward_loop` injects it
  into the owner over a DEALER socket, resending until the owner answers Stored; only then is the entry
  removed. A resend after a lost answer can make a duplicate DSN, never a lost one.
Never a DSN for a message whose sender is null (RFC 5321 6.1: no bounce of a bounce).
With `queue.delay_warning` > 0, one "delayed" DSN per message is sent once it has been queued that long,
listing the recipients not delivered yet.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING, cast

import zmq
import zmq.asyncio

from cluster.bus.ring import shard_for_address
from cluster.bus.schemas import Inject, InjectRefused, SchemaError, Stored, decode
from cluster.bus.security import cluster_keys, secure_client
from cluster.config import Config
from cluster.queue import metrics
from cluster.queue.dsn import RecipientReport, build_dsn
from cluster.queue.records import Message, QueueIdFactory, Recipient
from cluster.queue.spool import Batch, SpoolError

if TYPE_CHECKING:
    from cluster.queue.shard import Shard

log = logging.getLogger("mtacluster.queue")

RESEND_AFTER = 10.0
RETRY_UNCONNECTED = 0.5
DELAY_RECHECK = 60.0


class BounceMaker:
    def __init__(self, config: Config, index: int, ids: QueueIdFactory) -> None:
        self.config = config
        self.index = index
        self.ids = ids
        self.label = str(index)
        self.outbox: dict[str, Message] = {}
        self._delay_checks: list[tuple[float, str]] = []

    def build(self, message: Message, recipients: list[Recipient], headers: bytes, now: float, action: str,
              status: str = "") -> tuple[Message, bytes] | None:
        """A DSN about `recipients` of `message`, as a new spool message and its body; None for a null sender."""
        if not message.sender or not recipients:
            return None
        reports = [RecipientReport(r.address, action, r.last_reply, r.remote, now if r.attempts else 0.0, status)
                   for r in recipients]
        body = build_dsn(reporting_mta=self.config.smtp.hostname, queue_id=message.queue_id,
                         original_sender=message.sender, arrival=message.arrival, reports=reports,
                         original_headers=headers, now=now,
                         will_retry_until=message.arrival + self.config.queue.max_lifetime)
        owner = shard_for_address(message.sender, self.config.queue.shards)
        dsn = Message(self.ids.new(now), "", now, [Recipient(0, message.sender)], len(body),
                      {"dsn": action, "original_queue_id": message.queue_id},
                      forward_shard=-1 if owner == self.index else owner)
        return dsn, body

    def stored(self, shard: Shard, dsn: Message) -> None:
        """A DSN's transaction committed: schedule it here or hand it to the forwarder."""
        metrics.BOUNCES.labels(self.label, dsn.client.get("dsn", "failed")).inc()
        if dsn.forward_shard >= 0:
            self.outbox_add(dsn)
        else:
            shard.scheduler.add_message(dsn)
            shard.wake_dispatcher()

    def outbox_add(self, message: Message) -> None:
        self.outbox[message.queue_id] = message

    # -- delay warnings -----------------------------------------------------------------------------------

    def track(self, message: Message) -> None:
        """Remember when `message` is due for a delay warning (if those are on and it may get one)."""
        if self.config.queue.delay_warning > 0 and message.sender and not message.warned:
            heapq.heappush(self._delay_checks, (message.arrival + self.config.queue.delay_warning, message.queue_id))

    def check_delays(self, shard: Shard, now: float) -> None:
        while self._delay_checks and self._delay_checks[0][0] <= now:
            _, queue_id = heapq.heappop(self._delay_checks)
            message = shard.scheduler.messages.get(queue_id)
            if message is None or message.warned:
                continue
            pending = [r for r in message.recipients if not r.state.done]
            if pending:
                message.warned = True  # at most one, even while the DSN is being stored
                shard.spawn(self._warn(shard, message, pending, now))

    async def _warn(self, shard: Shard, message: Message, pending: list[Recipient], now: float) -> None:
        headers = await shard.read_headers(message.queue_id) or b""
        made = self.build(message, pending, headers, now, "delayed")
        batch = Batch(flags={message.queue_id: (True, message.forward_shard)})
        if made is not None:
            batch.add_message(*made)
        try:
            await shard.commit(batch)
        except SpoolError as exc:
            log.error("shard %d: cannot store the delay warning for %s: %s", self.index, message.queue_id, exc)
            message.warned = False
            heapq.heappush(self._delay_checks, (now + DELAY_RECHECK, message.queue_id))
            return
        if made is not None:
            self.stored(shard, made[0])

    # -- the outbox ---------------------------------------------------------------------------------------

    async def forward_loop(self, shard: Shard, context: zmq.asyncio.Context) -> None:
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
                due = [m for q, m in self.outbox.items() if now - sent_at.get(q, -math.inf) >= RESEND_AFTER]
                try:
                    bodies = await shard.read_bodies([m.queue_id for m in due]) if due else {}
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
                        if isinstance(reply, Stored) and queue_id in self.outbox:
                            await self._forwarded(shard, queue_id, reply.queue_id)
        finally:
            for socket in sockets.values():
                socket.close(linger=0)

    async def _forwarded(self, shard: Shard, queue_id: str, remote_queue_id: str) -> None:
        try:
            await shard.commit(Batch(removals=[queue_id]))
        except SpoolError as exc:
            log.error("shard %d: cannot remove forwarded DSN %s: %s", self.index, queue_id, exc)
            return
        del self.outbox[queue_id]
        log.info("shard %d: DSN %s stored by its owner as %s", self.index, queue_id, remote_queue_id)
