"""The outbox of one shard: DSNs stored here that belong to another shard, injected there until it has them.

A DSN goes to the shard that owns the original sender's domain (ARCHITECTURE.md contract 3). When that is
another shard, bounces.py stores the DSN here with `forward_shard` = the owner, in the same transaction as the
failures it reports. `forward_loop` injects each entry into its owner with the bus client (`BusLink`, one per
owner, CURVE like every bus client), asking again every `RESEND_AFTER` seconds until the owner answers Stored;
only then is the entry removed from the spool. A resend after a lost answer can make a duplicate DSN, never a
lost one.

Inputs: entries (`add`, at start from the spool and whenever a DSN is stored), the spool (`SpoolIO`: bodies,
removal), the configuration (shard endpoints, keys). Outputs: Inject requests to other shards, a log line per
forwarded DSN. Failure modes: an owner that is down or refuses is asked again after RESEND_AFTER seconds; a
spool error is logged and retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging

import zmq.asyncio

from cluster.bus.client import BusLink, NoAnswer
from cluster.bus.schemas import Inject, Stored
from cluster.bus.security import cluster_keys
from cluster.config import Config
from cluster.queue.records import Message
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO

log = logging.getLogger("mtacluster.queue")

RESEND_AFTER = 10.0


class Outbox:
    def __init__(self, config: Config, index: int, io: SpoolIO) -> None:
        self.config = config
        self.index = index
        self.io = io
        self.messages: dict[str, Message] = {}
        self._added = asyncio.Event()

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
        try:
            while True:
                self._added.clear()
                for queue_id, message in self.messages.items():
                    if queue_id in tasks and not tasks[queue_id].done():
                        continue
                    link = links.get(message.forward_shard)
                    if link is None:
                        link = links[message.forward_shard] = BusLink(
                            self.config.queue.shards[message.forward_shard], keys,
                            name=f"shard {message.forward_shard}", context=context)
                        link.start()
                    tasks[queue_id] = asyncio.create_task(self._forward(link, message))
                for queue_id in [q for q, task in tasks.items() if task.done()]:
                    del tasks[queue_id]
                await self._added.wait()
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            for link in links.values():
                await link.close()

    async def _forward(self, link: BusLink, message: Message) -> None:
        queue_id = message.queue_id
        while queue_id in self.messages:
            try:
                body = (await self.io.read_bodies([queue_id])).get(queue_id)
            except SpoolError as exc:
                log.error("shard %d: cannot read outbox DSN %s: %s", self.index, queue_id, exc)
                await asyncio.sleep(RESEND_AFTER)
                continue
            if body is None:
                return
            inject = Inject(0, "", [r.address for r in message.recipients], body, message.client)
            try:
                reply = await link.request(functools.partial(_numbered, inject), RESEND_AFTER)
            except NoAnswer as exc:
                log.debug("shard %d: DSN %s not forwarded yet: %s", self.index, queue_id, exc)
                continue
            if isinstance(reply, Stored):
                if await self._forwarded(queue_id, reply.queue_id):
                    return
            else:
                log.warning("shard %d: shard %d did not take DSN %s: %s", self.index, message.forward_shard,
                            queue_id, reply)
            await asyncio.sleep(RESEND_AFTER)

    async def _forwarded(self, queue_id: str, remote_queue_id: str) -> bool:
        try:
            await self.io.commit(Batch(removals=[queue_id]))
        except SpoolError as exc:
            log.error("shard %d: cannot remove forwarded DSN %s: %s", self.index, queue_id, exc)
            return False
        owner = self.messages.pop(queue_id).forward_shard
        log.info("%s: DSN stored by its owner, shard %d, as %s", queue_id, owner, remote_queue_id)
        return True


def _numbered(inject: Inject, req: int) -> Inject:
    return dataclasses.replace(inject, req=req)
