"""Storing new mail in one shard: Inject -> Stored (after fsync) or InjectRefused.

Inputs: an Inject (cluster/bus/schemas.py) from a frontend or another shard's outbox, the free space of the
spool's file system (`DiskSpace`, refreshed by maintenance.py). Outputs: the answer to send, and the stored
message handed to `on_stored` (the shard schedules it and tracks it for delay warnings).
Durability (ARCHITECTURE.md contract 1): Stored is answered only after the transaction holding the message
committed (group commit, spoolio.py). A message the dispatcher will send at once is stored with its recipients
in flight, and its body handed to the dispatcher (dispatch.py: one transaction per message).
Failure modes: below `queue.min_free_space` free, or when the spool reports a full disk, new mail is refused with
452 4.3.1; any other spool error with 451 4.3.0. Each refusal writes one log line (`NOQUEUE: reject: ...`, as
Postfix does) and counts in `mtacluster_queue_injects_refused_total`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cluster.bus.schemas import Inject, InjectRefused, Stored
from cluster.config import Config
from cluster.queue import metrics
from cluster.queue.records import Message, QueueIdFactory, Recipient
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO

log = logging.getLogger("mtacluster.queue")


class DiskSpace:
    """Free bytes on the spool's file system, as last measured (None until the first measurement)."""

    def __init__(self, label: str, measure: Callable[[], int]) -> None:
        self.label = label
        self.free: int | None = None
        self._measure = measure

    def refresh(self) -> None:
        try:
            self.free = self._measure()
        except OSError as exc:
            log.error("shard %s: cannot read free space of the spool: %s", self.label, exc)
            return
        metrics.DISK_FREE.labels(self.label).set(self.free)


class Injector:
    def __init__(self, config: Config, index: int, io: SpoolIO, ids: QueueIdFactory, space: DiskSpace,
                 clock: Callable[[], float], on_stored: Callable[[Message], None],
                 dispatched_at_once: Callable[[Message], bool] = lambda message: False,
                 keep_body: Callable[[str, bytes], None] = lambda queue_id, body: None) -> None:
        self.config = config
        self.index = index
        self.label = str(index)
        self.io = io
        self.ids = ids
        self.space = space
        self.clock = clock
        self._on_stored = on_stored
        # dispatch.py: whether a new message will be dispatched as soon as it is stored (it is then stored in
        # flight), and where its body is kept for that first Deliver.
        self._at_once = dispatched_at_once
        self._keep_body = keep_body
        self._stored = metrics.STORED.labels(self.label)

    async def handle(self, inject: Inject) -> Stored | InjectRefused:
        if not inject.recipients or any(not r for r in inject.recipients):
            return self._refuse(inject, "no_recipients", 554, "5.5.1", "No valid recipients", count=False)
        if self.short_of_space():
            return self._refuse(inject, "disk_full", 452, "4.3.1", "Insufficient system storage")
        client = {str(k): str(v) for k, v in inject.client.items()}
        try:
            stored = await self.store(inject.sender, inject.recipients, inject.body, client)
        except SpoolError as exc:
            log.error("shard %d: cannot store a message: %s", self.index, exc)
            if exc.disk_full:
                return self._refuse(inject, "disk_full", 452, "4.3.1", "Insufficient system storage")
            return self._refuse(inject, "spool_error", 451, "4.3.0", "Queue storage failed, try again")
        log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", stored.queue_id, stored.sender, stored.size,
                 len(stored.recipients))
        return Stored(inject.req, stored.queue_id)

    def short_of_space(self) -> bool:
        """True below `queue.min_free_space` free: new mail (and transfers) are refused with 452 4.3.1."""
        return self.space.free is not None and self.space.free < self.config.queue.min_free_space

    def _refuse(self, inject: Inject, reason: str, code: int, enhanced: str, text: str,
                count: bool = True) -> InjectRefused:
        if count:
            metrics.INJECTS_REFUSED.labels(self.label, reason).inc()
        log.warning("NOQUEUE: reject: from=<%s> nrcpt=%d: %d %s %s", inject.sender, len(inject.recipients), code,
                    enhanced, text)
        return InjectRefused(inject.req, code, enhanced, text)

    async def store(self, sender: str, recipients: list[str], body: bytes, client: dict[str, str]) -> Message:
        """Store a new message (group commit); it is handed to `on_stored` once durable."""
        now = self.clock()
        message = Message(self.ids.new(now), sender, now, [Recipient(i, r) for i, r in enumerate(recipients)],
                          len(body), client)
        at_once = self._at_once(message)
        await self.io.commit(Batch(stores=[message], bodies={message.queue_id: body},
                                   in_flight={message.queue_id} if at_once else set()))
        self._stored.inc()
        if at_once:
            self._keep_body(message.queue_id, body)
        self._on_stored(message)
        return message
