"""Bounces and delay warnings of one shard: which DSN to make, and where it goes once stored.

A DSN (dsn.py) goes from the null sender to the original sender, into the shard that owns the sender's
domain (ARCHITECTURE.md contract 3, `shard_for_address`). It is created in the same spool transaction that
records the failures it reports (ledger.py), so a crash can lose neither:
- when this shard owns the sender's domain, the DSN is stored as an ordinary local message and scheduled;
- otherwise it is stored as an outbox entry (`forward_shard` = the owner) and handed to the `Outbox`.
Never a DSN for a message whose sender is null (RFC 5321 6.1: no bounce of a bounce).
With `queue.delay_warning` > 0, one "delayed" DSN per message is sent once it has been queued that long,
listing the recipients not delivered yet.

Inputs: the configuration, the queue id factory, the spool (`SpoolIO`), a lookup of queued messages, and
where stored DSNs go (`schedule_local`, the `Outbox`). Outputs: DSN messages and bodies (`build`), delay
warnings committed to the spool. Failure modes: a spool error while storing a delay warning is logged and
the warning is tried again after `DELAY_RECHECK` seconds.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from cluster.bus.ring import shard_for_address
from cluster.config import Config
from cluster.queue import metrics
from cluster.queue.dsn import RecipientReport, build_dsn
from cluster.queue.outbox import Outbox
from cluster.queue.records import Message, QueueIdFactory, Recipient
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO

log = logging.getLogger("mtacluster.queue")

DELAY_RECHECK = 60.0


class BounceMaker:
    def __init__(self, config: Config, index: int, ids: QueueIdFactory, io: SpoolIO, outbox: Outbox,
                 find: Callable[[str], Message | None], schedule_local: Callable[[Message], None],
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.config = config
        self.index = index
        self.ids = ids
        self.label = str(index)
        self.io = io
        self.outbox = outbox
        self._find = find
        self._schedule_local = schedule_local
        self._spawn = spawn
        self._delay_checks: list[tuple[float, str]] = []

    def build(self, message: Message, recipients: list[Recipient], headers: bytes, now: float,
              action: str) -> tuple[Message, bytes] | None:
        """A DSN about `recipients` of `message`, as a new spool message and its body; None for a null sender."""
        if not message.sender or not recipients:
            return None
        reports = [RecipientReport(r.address, action, r.last, now if r.attempts else 0.0) for r in recipients]
        body = build_dsn(reporting_mta=self.config.smtp.hostname, queue_id=message.queue_id,
                         original_sender=message.sender, arrival=message.arrival, reports=reports,
                         original_headers=headers, now=now,
                         will_retry_until=message.arrival + self.config.queue.max_lifetime)
        owner = shard_for_address(message.sender, self.config.queue.shards)
        dsn = Message(self.ids.new(now), "", now, [Recipient(0, message.sender)], len(body),
                      {"dsn": action, "original_queue_id": message.queue_id},
                      forward_shard=-1 if owner == self.index else owner)
        return dsn, body

    def stored(self, dsn: Message) -> None:
        """A DSN's transaction committed: schedule it here or hand it to the outbox."""
        metrics.BOUNCES.labels(self.label, dsn.client.get("dsn", "failed")).inc()
        if dsn.forward_shard >= 0:
            self.outbox.add(dsn)
        else:
            self._schedule_local(dsn)

    # -- delay warnings -----------------------------------------------------------------------------------

    def track(self, message: Message) -> None:
        """Remember when `message` is due for a delay warning (if those are on and it may get one)."""
        if self.config.queue.delay_warning > 0 and message.sender and not message.warned:
            heapq.heappush(self._delay_checks, (message.arrival + self.config.queue.delay_warning, message.queue_id))

    def check_delays(self, now: float) -> None:
        while self._delay_checks and self._delay_checks[0][0] <= now:
            _, queue_id = heapq.heappop(self._delay_checks)
            message = self._find(queue_id)
            if message is None or message.warned:
                continue
            pending = [r for r in message.recipients if not r.state.done]
            if pending:
                message.warned = True  # at most one, even while the DSN is being stored
                self._spawn(self._warn(message, pending, now))

    async def _warn(self, message: Message, pending: list[Recipient], now: float) -> None:
        headers = await self.io.read_headers(message.queue_id) or b""
        made = self.build(message, pending, headers, now, "delayed")
        batch = Batch(flags={message.queue_id: (True, message.forward_shard)})
        if made is not None:
            batch.add_message(*made)
        try:
            await self.io.commit(batch)
        except SpoolError as exc:
            log.error("shard %d: cannot store the delay warning for %s: %s", self.index, message.queue_id, exc)
            message.warned = False
            heapq.heappush(self._delay_checks, (now + DELAY_RECHECK, message.queue_id))
            return
        if made is not None:
            self.stored(made[0])
            log.info("%s: sender delay notification: %s", message.queue_id, made[0].queue_id)
