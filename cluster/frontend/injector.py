"""Hand accepted messages to the queue shards and wait until they are on disk (ARCHITECTURE.md contract 1).

`ShardClient.inject()` splits a message's recipients by the shard that owns each recipient's domain
(rendezvous hashing, `cluster.bus.ring`), sends one `Inject` per shard over its bus link
(`cluster.bus.client`), and waits for every shard's `Stored`. Only then is the answer 250. A refusal from a
shard (`InjectRefused`, e.g. 452 4.3.1 disk full) is passed on; a timeout or an unreachable shard gives
451 4.3.0 and the client retries. If one shard stored its part and another did not, the client's retry stores
that part again: a duplicate, not a loss (the contract allows duplicates, never losses).

Readiness: each shard is pinged every second; `all_reachable()` is true when every shard answered within the
last few seconds and said it is ready. A drained shard counts as reachable, also once it stops answering (its
pod scaled away before the shard list is shortened): it holds and takes no mail.

Draining (issue 14): the ping's answer carries the shard's `state` (serving, draining, drained). New mail for
the domains of a shard that is not serving goes to their owner on the ring without it (`excluded`), so no
configuration change is needed to drain a shard; a message already being stored there finishes normally.
A new `queue.shards` list (SIGHUP, cluster/roles.py) is taken without a restart (`set_shards`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

from cluster.bus.client import BusLink, NoAnswer
from cluster.bus.ring import shard_for_address
from cluster.bus.schemas import AdminReply, AdminRequest, BusMessage, InjectRefused, Stored, inject_frame
from cluster.bus.security import CurveKeys
from cluster.frontend import metrics
from cluster.smtp import replies
from cluster.smtp.replies import Reply

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0
REACHABLE_WITHIN = 5.0


class ShardClient:
    def __init__(self, shards: Sequence[str], timeout: float, keys: CurveKeys | None = None) -> None:
        self.shards = list(shards)
        self.timeout = timeout
        # Liveness: a shard silent (ZMTP heartbeats included) for REACHABLE_WITHIN seconds loses its connection,
        # and with it the injects queued to it (their clients got 451 already); a fresh one is made when it is back.
        self.keys = keys
        self.links = [self._link(index, endpoint) for index, endpoint in enumerate(self.shards)]
        self._ready = [False] * len(self.links)
        # Shards that said they are draining or drained: the ring skips them for new mail.
        self.excluded: frozenset[int] = frozenset()
        # Shards that last said they are drained (a subset of `excluded`).
        self.drained: frozenset[int] = frozenset()
        self._tasks: list[asyncio.Task[None]] = []

    def _link(self, index: int, endpoint: str) -> BusLink:
        # Direct mode: requests sent and answers waited for without pyzmq's asyncio layer (cluster/bus/client.py).
        return BusLink(endpoint, self.keys, name=f"shard {index}", liveness=REACHABLE_WITHIN, direct=True)

    def start(self) -> None:
        for index, link in enumerate(self.links):
            link.start()
            self._tasks.append(asyncio.create_task(self._ping_forever(index, link)))

    async def set_shards(self, shards: Sequence[str]) -> None:
        """Take a new `queue.shards` list (SIGHUP): links to changed or removed endpoints are closed, new ones
        made; indices keep their meaning, so only the domains of added or removed shards move."""
        shards = list(shards)
        if shards == self.shards:
            return
        old_links, old_tasks = self.links, self._tasks
        links: list[BusLink] = []
        tasks: list[asyncio.Task[None]] = []
        ready: list[bool] = []
        for index, endpoint in enumerate(shards):
            if index < len(self.shards) and self.shards[index] == endpoint:
                links.append(old_links[index])
                tasks.append(old_tasks[index])
                ready.append(self._ready[index])
                continue
            link = self._link(index, endpoint)
            link.start()
            links.append(link)
            tasks.append(asyncio.create_task(self._ping_forever(index, link)))
            ready.append(False)
        self.shards, self.links, self._tasks, self._ready = shards, links, tasks, ready
        self.excluded = frozenset(i for i in self.excluded if i < len(shards))
        self.drained = frozenset(i for i in self.drained if i < len(shards) and i < len(old_links)
                                 and links[i] is old_links[i])
        gone = [(link, task) for link, task in zip(old_links, old_tasks, strict=True) if link not in links]
        for link, task in gone:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await link.close()
        log.info("queue.shards reloaded: %d shards (%d links replaced)", len(shards), len(gone))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links:
            await link.close()

    def all_reachable(self) -> bool:
        reachable = sum(1 for index, link in enumerate(self.links)
                        if index in self.drained or (self._ready[index] and link.heard_within(REACHABLE_WITHIN)))
        metrics.SHARDS_REACHABLE.set(reachable)
        return reachable == len(self.links)

    def unreachable(self) -> list[str]:
        """The endpoints of the shards that are not reachable and ready now."""
        return [self.shards[index] for index, link in enumerate(self.links)
                if index not in self.drained and not (self._ready[index] and link.heard_within(REACHABLE_WITHIN))]

    async def _ping_forever(self, index: int, link: BusLink) -> None:
        while True:
            try:
                answer = await link.request(lambda req: AdminRequest(req=req, op="ping"), PING_INTERVAL * 2)
            except NoAnswer:
                pass
            else:
                # A shard still recovering its spool answers, but is not ready to store mail yet.
                if isinstance(answer, AdminReply) and answer.ok and isinstance(answer.data, dict):
                    self._ready[index] = bool(answer.data.get("ready"))
                    self._note_state(index, answer.data.get("state", "serving"))
            await asyncio.sleep(PING_INTERVAL)

    def _note_state(self, index: int, state: object) -> None:
        self.drained = self.drained | {index} if state == "drained" else self.drained - {index}
        serving = state not in ("draining", "drained")
        if serving == (index not in self.excluded):
            return
        self.excluded = self.excluded - {index} if serving else self.excluded | {index}
        log.info("shard %d is %s: new mail for its domains goes %s", index, state,
                 "to it again" if serving else "to the other shards")

    async def _inject_one(self, index: int, sender: str, recipients: list[str], body: tuple[bytes, ...],
                          client: dict[str, str]) -> Stored | InjectRefused | None:
        link = self.links[index]
        started = time.perf_counter()
        try:
            answer = await link.request(lambda req: inject_frame(req, sender, recipients, body, client), self.timeout)
        except NoAnswer as missing:
            log.warning("%s did not store a message: %s", link.name, missing)
            return None
        if isinstance(answer, Stored | InjectRefused):
            metrics.inject_duration(index).observe(time.perf_counter() - started)
            return answer
        log.warning("%s answered an inject with %r", link.name, answer)
        return None
    async def ask(self, shard: int, message: BusMessage) -> BusMessage | None:
        """Send one request to shard `shard` (its `req` replaced by the link's own numbering); the answer, or None
        when none came within `timeout` (an unreachable shard included)."""
        link = self.links[shard]
        try:
            return await link.request(lambda req: dataclasses.replace(message, req=req),  # type: ignore[call-arg]
                                      self.timeout)
        except NoAnswer as missing:
            log.warning("%s: no answer to a %s: %s", link.name, message.TYPE, missing)
            return None

    async def inject(self, sender: str, recipients: Sequence[str], body: bytes,
                     client: dict[str, str], *, head: bytes = b"") -> tuple[Reply, list[str]]:
        """Store one message on every shard that owns some of its recipients: (reply for the client, queue ids).

        The stored body is `head + body` (head: the trace header fields the frontend puts on top), joined once,
        into each Inject frame (cluster.bus.schemas.inject_frame), not into a body first."""
        body_parts = (head, body) if head else (body,)
        parts: dict[int, list[str]] = {}
        if len(self.shards) == 1 and not self.excluded:  # one shard owns every domain: nothing to look up
            if recipients:
                parts[0] = list(recipients)
        else:
            owners: dict[str, int] = {}  # domain as written -> its shard: the ring is asked once per domain
            for recipient in recipients:
                _, at, domain = recipient.rpartition("@")
                if not at:
                    domain = ""  # no domain: the first shard, as for "x@" (shard_for_address)
                owner = owners.get(domain)
                if owner is None:
                    owner = owners[domain] = shard_for_address(recipient, self.shards, self.excluded)
                part = parts.get(owner)
                if part is None:
                    parts[owner] = [recipient]
                else:
                    part.append(recipient)
        if len(parts) == 1:  # the usual case: no task per shard needed
            [(index, part)] = parts.items()
            answers: list[Stored | InjectRefused | None] = [await self._inject_one(index, sender, part, body_parts,
                                                                                      client)]
        else:
            answers = list(await asyncio.gather(*(
                self._inject_one(index, sender, part, body_parts, client) for index, part in parts.items())))
        refusals = [a for a in answers if isinstance(a, InjectRefused)]
        if refusals:
            worst = max(refusals, key=lambda r: r.code)
            return Reply.of(worst.code, worst.enhanced, worst.text), []
        if any(a is None for a in answers):
            return replies.QUEUE_UNAVAILABLE, []
        queue_ids = [a.queue_id for a in answers if isinstance(a, Stored)]
        return replies.queued_as(queue_ids), queue_ids
