"""Storing new mail in one shard: Inject -> Stored (after fsync) or InjectRefused.

Inputs: an Inject (cluster/bus/schemas.py) from a frontend or another shard's outbox, the free space of the spool's
file system (`DiskSpace`, refreshed by maintenance.py). Outputs: the answer to send, and the stored message handed
to `on_stored` (the shard schedules it and tracks it for delay warnings). Durability (ARCHITECTURE.md contract 1):
Stored is answered only after the transaction holding the message committed (group commit, spoolio.py):
`begin_many(injects, answer)` calls `answer` from the fsync's completion itself (commit.py), before the rest of that
turn's work, and their log lines are written right after those answers; the messages are handed on (scheduled)
once all of that fsync's are answered. A message the
dispatcher will send at once is stored with its recipients in flight, and its body handed to the dispatcher
(dispatch.py: one transaction per message).
Failure modes: below `queue.min_free_space` free, or when the spool reports a full disk, new mail is refused with
452 4.3.1; any other spool error with 451 4.3.0. Each refusal writes one log line (`NOQUEUE: reject: ...`, as
Postfix does) and counts in `mtacluster_queue_injects_refused_total`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cluster.bus.schemas import Inject, InjectRefused, Stored
from cluster.config import Config
from cluster.logs import direct, flush_direct
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
        # Messages answered Stored whose scheduling waits for the end of the answers (`_hand_on`), by batch.
        self._handing_on: list[tuple[Batch, list[Message]]] = []

    def begin_many(self, injects: list[Inject], answer: Callable[[int, Stored | InjectRefused], None]) -> None:
        """Store the messages of `injects` in one batch (one group-commit part, so one spool transaction for every
        Inject read in one turn of the shard); `answer(position, reply)` gets each one's Stored from the fsync's
        completion itself, or its refusal (at once, or when the batch cannot be committed)."""
        messages: list[tuple[int, Message]] = []
        batch = Batch()
        now = self.clock()
        for position, inject in enumerate(injects):
            if not inject.recipients or any(not r for r in inject.recipients):
                answer(position, self._refuse(inject, "no_recipients", 554, "5.5.1", "No valid recipients",
                                              count=False))
            elif self.short_of_space():
                answer(position, self._refuse(inject, "disk_full", 452, "4.3.1", "Insufficient system storage"))
            else:
                client = inject.client
                if not all(type(k) is str and type(v) is str for k, v in client.items()):
                    client = {str(k): str(v) for k, v in client.items()}
                message = self._add(batch, inject.sender, inject.recipients, inject.body, client, now)
                messages.append((position, message))
        if not messages:
            return

        def durable(error: SpoolError | None) -> None:
            if error is not None:
                log.error("shard %d: cannot store %d messages: %s", self.index, len(messages), error)
                for position, _ in messages:
                    inject = injects[position]
                    answer(position, self._refuse(inject, "disk_full", 452, "4.3.1", "Insufficient system storage")
                           if error.disk_full else
                           self._refuse(inject, "spool_error", 451, "4.3.0", "Queue storage failed, try again"))
                return
            for position, message in messages:  # the clients are waiting for their 250
                answer(position, Stored(injects[position].req, message.queue_id))
            self._stored.inc(len(messages))
            self._log_stored(messages)  # once answered, not a turn later (cluster/logs.py)
            if not self._handing_on:  # the rest once every message of this fsync is answered
                asyncio.get_running_loop().call_soon(self._hand_on)
            self._handing_on.append((batch, [message for _, message in messages]))

        self.io.commit_then(batch, durable)

    def _hand_on(self) -> None:
        handing_on, self._handing_on = self._handing_on, []
        for batch, messages in handing_on:
            for message in messages:
                self._follow(batch, message)

    @staticmethod
    def _log_stored(messages: list[tuple[int, Message]]) -> None:
        """One line per message answered Stored, written at once."""
        writer = direct(log)  # the text line without the logging module's record (cluster/logs.py)
        for _, message in messages:
            if writer is not None:
                writer.write(log, f"{message.queue_id}: from=<{message.sender}>, size={message.size}, "
                                  f"nrcpt={len(message.recipients)} (queue active)")
            else:
                log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", message.queue_id,
                         message.sender, message.size, len(message.recipients))
        if writer is not None:
            flush_direct()

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

    def _add(self, batch: Batch, sender: str, recipients: list[str], body: bytes, client: dict[str, str],
             now: float) -> Message:
        """A new message into `batch`: stored in flight when it will be dispatched at once (dispatch.py)."""
        message = Message(self.ids.new(now), sender, now, [Recipient(i, r) for i, r in enumerate(recipients)],
                          len(body), client)
        batch.stores.append(message)
        batch.bodies[message.queue_id] = body
        if self._at_once(message):
            batch.in_flight.add(message.queue_id)
        return message

    def _follow(self, batch: Batch, message: Message) -> None:
        """`message` is durable: keep its body for its first Deliver when it was stored in flight, schedule it."""
        if message.queue_id in batch.in_flight:
            self._keep_body(message.queue_id, batch.bodies[message.queue_id])
        self._on_stored(message)
