"""The outbox of one shard: messages stored here that belong to another shard, sent there until it has them.

A DSN goes to the shard that owns the original sender's domain (ARCHITECTURE.md contract 3). When that is
another shard, bounces.py stores the DSN here with `forward_shard` = the owner, in the same transaction as the
failures it reports. A draining shard (drain.py) puts its queued messages here the same way, each marked for
its new owner (ARCHITECTURE.md contract 7). `forward_loop` sends each entry to its owner as a `Transfer`
(transfer.py: the message with its recipients' state) with the bus client (`BusLink`, one per owner, CURVE like
every bus client), asking again every `RESEND_AFTER` seconds until the owner answers Stored; only then is the
entry removed from the spool. The owner stores a Transfer idempotently (keyed by queue id and hop count), so a
resend after a lost answer is neither lost nor doubled. Once an entry is removed here it is never sent again,
so the owner may forget its key: the removed keys are sent to each owner every CONFIRM_INTERVAL seconds as the
admin op `transfers_confirmed` (best effort: a lost confirmation only makes the owner keep the key until its
TTL, cluster/queue/journal.py).

Inputs: entries (`add`, at start from the spool and whenever a DSN is stored or drain.py moves a message), the
spool (`SpoolIO`: bodies, removal), the configuration (shard endpoints, keys). Outputs: Transfer requests to
other shards, a log line per forwarded entry, mtacluster_queue_transfers_total{outcome="sent"}. Failure modes:
an owner that is down or refuses is asked again after RESEND_AFTER seconds; a spool error is logged and
retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import zmq.asyncio

from cluster.bus.client import BusLink, NoAnswer
from cluster.bus.schemas import AdminRequest, Stored, Transfer
from cluster.bus.security import cluster_keys
from cluster.config import Config
from cluster.queue import metrics
from cluster.queue.records import Message
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO
from cluster.queue.transfer import transfer_of

log = logging.getLogger("mtacluster.queue")

RESEND_AFTER = 10.0
# How often (seconds) the keys of delivered transfers are confirmed to their owners, and how long each waits.
CONFIRM_INTERVAL = 1.0
CONFIRM_TIMEOUT = 5.0


class Outbox:
    def __init__(self, config: Config, index: int, io: SpoolIO) -> None:
        self.config = config
        self.index = index
        self.io = io
        self.messages: dict[str, Message] = {}
        self._added = asyncio.Event()
        # Keys ("<queue id>#<hops>") of entries removed after their owner's Stored, by owner, not confirmed yet.
        self.to_confirm: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, message: Message) -> None:
        self.messages[message.queue_id] = message
        self._added.set()

    async def forward_loop(self, context: zmq.asyncio.Context) -> None:
        """Forward every outbox entry to its owner, one task per entry, until each is Stored."""
        keys = cluster_keys(self.config.bus)
        links: dict[int, BusLink] = {}
        tasks: dict[str, asyncio.Task[None]] = {}

        def link_to(owner: int) -> BusLink:
            link = links.get(owner)
            if link is None:
                link = links[owner] = BusLink(self.config.queue.shards[owner], keys, name=f"shard {owner}",
                                              context=context)
                link.start()
            return link

        confirming = asyncio.create_task(self._confirm_loop(link_to))
        try:
            while True:
                self._added.clear()
                for queue_id, message in self.messages.items():
                    if queue_id in tasks and not tasks[queue_id].done():
                        continue
                    tasks[queue_id] = asyncio.create_task(self._forward(link_to(message.forward_shard), message))
                for queue_id in [q for q, task in tasks.items() if task.done()]:
                    del tasks[queue_id]
                await self._added.wait()
        finally:
            confirming.cancel()
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(confirming, *tasks.values(), return_exceptions=True)
            for link in links.values():
                await link.close()

    async def _forward(self, link: BusLink, message: Message) -> None:
        queue_id = message.queue_id
        while queue_id in self.messages:
            try:
                body = (await self.io.read_bodies([queue_id])).get(queue_id)
            except SpoolError as exc:
                log.error("shard %d: cannot read outbox entry %s: %s", self.index, queue_id, exc)
                await asyncio.sleep(RESEND_AFTER)
                continue
            if body is None:
                return
            transfer = transfer_of(message, body, self.index, 0)
            try:
                reply = await link.request(functools.partial(_numbered, transfer), RESEND_AFTER)
            except NoAnswer as exc:
                log.debug("shard %d: %s not forwarded yet: %s", self.index, queue_id, exc)
                continue
            if isinstance(reply, Stored):
                if await self._forwarded(queue_id, reply.queue_id):
                    self.to_confirm.setdefault(message.forward_shard, []).append(f"{queue_id}#{transfer.hops}")
                    return
            else:
                log.warning("shard %d: shard %d did not take %s: %s", self.index, message.forward_shard,
                            queue_id, reply)
            await asyncio.sleep(RESEND_AFTER)

    async def _forwarded(self, queue_id: str, remote_queue_id: str) -> bool:
        try:
            await self.io.commit(Batch(removals=[queue_id]))
        except SpoolError as exc:
            log.error("shard %d: cannot remove forwarded %s: %s", self.index, queue_id, exc)
            return False
        owner = self.messages.pop(queue_id).forward_shard
        metrics.TRANSFERS.labels(str(self.index), "sent").inc()
        log.info("%s: stored by its owner, shard %d, as %s; removed here", queue_id, owner, remote_queue_id)
        return True


    async def _confirm_loop(self, link_to: Callable[[int], BusLink]) -> None:
        while True:
            await asyncio.sleep(CONFIRM_INTERVAL)
            pending, self.to_confirm = self.to_confirm, {}
            for owner, keys in pending.items():
                request = functools.partial(_admin_request, "transfers_confirmed", {"keys": keys})
                try:
                    await link_to(owner).request(request, CONFIRM_TIMEOUT)
                except NoAnswer as exc:
                    log.info("shard %d: %d transfer confirmations to shard %d lost (it keeps those keys until "
                             "their TTL): %s", self.index, len(keys), owner, exc)


def _admin_request(op: str, args: dict[str, Any], req: int) -> AdminRequest:
    return AdminRequest(req=req, op=op, args=args)


def _numbered(transfer: Transfer, req: int) -> Transfer:
    return dataclasses.replace(transfer, req=req)
