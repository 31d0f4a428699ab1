"""Draining a shard: stop taking new mail, hand every queued message to its new owner, exactly once (issue 14).

States, kept in the file `drain-state` of the shard's spool directory (written atomically with fsync, so a
drained shard stays drained over restarts until `mtacluster shard undrain N`):

    serving  --drain-->  draining  --(nothing left to move)-->  drained  --undrain-->  serving

The state travels in the answers frontends and workers already get (ping's data, HeartbeatAck.state):
frontends route new mail for this shard's domains to their owner on the ring without it (cluster/bus/ring.py,
`excluded`). While not serving, the shard dispatches nothing new (jobs already out finish normally), and each
maintenance tick moves up to MOVE_BATCH messages with no recipient in flight to the outbox (outbox.py), in one
spool transaction per batch: a message whose pending recipients all belong to one new owner is marked for it
in place (`forward_shard`, same queue id); one whose recipients belong to several is cut into one part per
owner, as the frontend cuts a message (queue id `<id>.<owner>`), the original removed in the same transaction.
The outbox sends each entry as a `Transfer` (recipient states, attempts, next attempt, held, last outcome,
delay warning sent, arrival; the trace id is in the body's headers) and deletes it only after the owner's
Stored. Mail that still arrives (an inject already under way, a DSN from another shard) is moved the same way.
The owners are found on the ring without this shard and without every shard that said (ping) it is not
serving, so two shards draining at once do not pass mail back and forth.

Other owned state moves too (handover.py): suppression entries and per-user sending counters go to the shard
that now owns each address's domain or user name, from the first tick of the drain on (and again for any
entry that arrives later), each deleted here only after its owner answered; the shard calls itself drained
only when its queue, its outbox and that state are all gone. Shaping state is derived from configuration and
recent replies, and is rebuilt by the new owner.

Receiving (`receive`): a Transfer is stored under its own queue id, keyed by (queue_id, hops): the message
is committed first, then the key is appended (fsynced) to the journal `transfers-received` in the spool
directory (journal.py), then Stored is answered. A resend of a key this shard holds (in its queue or outbox)
or once held (the journal) is answered Stored without storing again, so a retry after a crash of either side
neither loses nor doubles it. The journal forgets a key when its sender confirms it deleted its copy (admin
op `transfers_confirmed`, sent by the sender's outbox) or `queue.max_lifetime` after it was received; the
rule is in journal.py. Trimming runs from the maintenance tick every TRIM_INTERVAL seconds.

Inputs: the configuration, the shard index, the spool directory (None: state and journal in memory only, for
unit tests), the scheduler, the ledger's message locks, the spool, the outbox, the dispatcher, `on_stored`
(schedule a received message). Outputs: the state, the moves (spool transactions and outbox entries), the
answers to Transfers, log lines per moved and received message, metrics (cluster/queue/metrics.py).
Failure modes: a spool error while moving is logged and the batch is tried again at a later tick; while
receiving it is answered 451 4.3.0 (452 4.3.1 when the disk is full), and the sender asks again later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import zmq.asyncio

from cluster.bus.client import BusLink, ask_all, links_to
from cluster.bus.ring import shard_for_address
from cluster.bus.schemas import (
    AdminReply,
    AdminRequest,
    InjectRefused,
    Stored,
    Transfer,
)
from cluster.bus.security import cluster_keys
from cluster.config import Config
from cluster.queue import metrics
from cluster.queue.handover import IMPORT_OPS, Handover
from cluster.queue.journal import TransferJournal
from cluster.queue.ledger import MessageLocks
from cluster.queue.outbox import Outbox
from cluster.queue.records import Message, Recipient, State
from cluster.queue.scheduler import Scheduler
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.spoolio import SpoolIO
from cluster.queue.transfer import message_of

log = logging.getLogger("mtacluster.queue")

SERVING, DRAINING, DRAINED = "serving", "draining", "drained"
STATES = (SERVING, DRAINING, DRAINED)
# The admin operations drain.py answers (`mtacluster shard drain|undrain|status`).
DRAIN_OPS = ("drain", "undrain", "drain_status", "transfers_confirmed", *IMPORT_OPS)
STATE_FILE = "drain-state"
# Seconds before handing owned state over again after an owner did not take it.
HANDOVER_RETRY = 5.0
# How often (seconds) the journal of received transfers is looked at for keys to forget.
TRIM_INTERVAL = 10.0
# Messages moved to the outbox per spool transaction (one per maintenance tick at most).
MOVE_BATCH = 500
# How often a shard that is not serving asks the others for their state (seconds).
PEER_POLL = 1.0


class DrainError(ValueError):
    """A drain request that cannot be carried out (bad state argument)."""


class Drain:
    def __init__(self, config: Config, index: int, directory: Path | None, scheduler: Scheduler,
                 locks: MessageLocks, io: SpoolIO, outbox: Outbox, set_dispatching: Callable[[bool], None],
                 on_stored: Callable[[Message], None],
                 spawn: Callable[[Coroutine[Any, Any, None]], None], handover: Handover,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.index = index
        self.label = str(index)
        self.directory = directory
        self.scheduler = scheduler
        self.locks = locks
        self.io = io
        self.outbox = outbox
        self._set_dispatching = set_dispatching
        self._on_stored = on_stored
        self.clock = clock
        self._spawn = spawn
        self.handover = handover
        self._handing_over = False
        self._next_handover = float("-inf")
        self._links: list[BusLink] = []
        self.state = SERVING
        self.others_not_serving: frozenset[int] = frozenset()
        self.moved = 0
        self._moving = False
        self.journal = TransferJournal(directory, float(config.queue.max_lifetime))
        self._trimming = False
        self._last_trim = float("-inf")
        self._receiving: dict[str, asyncio.Future[None]] = {}
        metrics.initialise_drain(self.label)

    # -- state ------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the persisted state and the journal of received transfers (call before serving)."""
        if self.directory is not None:
            try:
                saved = json.loads((self.directory / STATE_FILE).read_text())
            except FileNotFoundError:
                saved = {}
            except (OSError, ValueError) as exc:
                log.error("shard %d: unreadable %s (%s): staying drained to be safe", self.index, STATE_FILE, exc)
                saved = {"state": DRAINED}
            state = saved.get("state", SERVING) if isinstance(saved, dict) else SERVING
            self.state = state if state in STATES else SERVING
            self.journal.load(self.clock())
            metrics.TRANSFER_JOURNAL.labels(self.label).set(len(self.journal))
        self._apply()
        if self.state != SERVING:
            log.info("shard %d starts %s: it takes no new mail and hands its queue to the other shards", self.index,
                     self.state)

    def _apply(self) -> None:
        self._set_dispatching(self.state == SERVING)
        for state in STATES:
            metrics.DRAIN_STATE.labels(self.label, state).set(1 if state == self.state else 0)

    def _save(self, state: str) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = self.directory / f"{STATE_FILE}.tmp"
            with open(temporary, "w") as file:
                file.write(json.dumps({"state": state}))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.directory / STATE_FILE)
            descriptor = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        previous, self.state = self.state, state
        self._apply()
        if previous != state:
            log.info("shard %d: %s -> %s", self.index, previous, state)

    async def handle_admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """drain {} / undrain {} / drain_status {} -> the status map."""
        if op == "drain":
            if self.state == SERVING:
                await asyncio.to_thread(self._save, DRAINING)
        elif op == "undrain":
            if self.state != SERVING:
                await asyncio.to_thread(self._save, SERVING)
        elif op == "transfers_confirmed":
            keys = args.get("keys")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise DrainError("transfers_confirmed needs a list of keys")
            return {"shard": self.index, "confirmed": self.journal.confirm(keys)}
        elif op == "suppression_import":
            return self.handover.import_suppression(args)
        elif op == "usage_import":
            return await self.handover.import_usage(args)
        elif op != "drain_status":
            raise DrainError(f"unknown drain operation {op!r}")
        return self.status()

    def status(self) -> dict[str, Any]:
        return {"shard": self.index, "state": self.state, "queued": len(self.scheduler.messages),
                "outbox": len(self.outbox), "moved": self.moved, "remaining": self.remaining,
                "state_entries": self.handover.left() if self.state != SERVING else 0,
                "others_not_serving": sorted(self.others_not_serving)}

    @property
    def remaining(self) -> int:
        """Messages still to hand over (0 while serving)."""
        return 0 if self.state == SERVING else len(self.scheduler.messages) + len(self.outbox)

    def excluded(self) -> frozenset[int]:
        """Shards that take no new mail, as this shard knows it: itself when not serving, and the others that
        said so."""
        return self.others_not_serving | ({self.index} if self.state != SERVING else frozenset())

    # -- moving the queue out ---------------------------------------------------------------------------------

    def tick(self) -> None:
        metrics.DRAIN_REMAINING.labels(self.label).set(self.remaining)
        now = self.clock()
        if not self._trimming and now - self._last_trim >= TRIM_INTERVAL:
            self._last_trim = now
            if self.journal.due(now):
                self._trimming = True
                self._spawn(self.trim_journal(now))
        if self.state == SERVING:
            return
        if self.handover.left() and not self._handing_over and self._links and now >= self._next_handover:
            self._handing_over = True
            self._spawn(self._hand_over())
        if self._moving:
            return
        if not self.scheduler.messages:
            if self.state == DRAINING and not len(self.outbox):
                self._moving = True
                self._spawn(self._finish())
            return
        self._moving = True
        self._spawn(self._move_batch())

    async def _hand_over(self) -> None:
        complete = False
        try:
            complete = await self.handover.hand_over(self._links, self.config.queue.shards, self.excluded())
        finally:
            self._handing_over = False
            if not complete:  # an owner did not answer: not again before HANDOVER_RETRY
                self._next_handover = self.clock() + HANDOVER_RETRY

    async def _finish(self) -> None:
        try:
            if not await self.handover.hand_over(self._links, self.config.queue.shards, self.excluded()):
                return
            if self.state == DRAINING and not self.scheduler.messages and not len(self.outbox):
                await asyncio.to_thread(self._save, DRAINED)
                log.info("shard %d drained: %d messages handed to the other shards", self.index, self.moved)
        finally:
            self._moving = False

    async def _move_batch(self) -> None:
        try:
            movable = [m.queue_id for m in list(self.scheduler.messages.values())[:MOVE_BATCH * 2]
                       if not self.scheduler.is_locked(m.queue_id)
                       and all(r.state is not State.IN_FLIGHT for r in m.recipients)][:MOVE_BATCH]
            if movable:
                await self._move(movable)
        except SpoolError as exc:
            log.error("shard %d: cannot move messages to the outbox (will try again): %s", self.index, exc)
        finally:
            self._moving = False

    async def _move(self, queue_ids: list[str]) -> None:
        excluded = self.excluded()
        shards = self.config.queue.shards
        async with self.locks.hold(queue_ids):
            messages = [m for q in queue_ids if (m := self.scheduler.messages.get(q)) is not None
                        and all(r.state is not State.IN_FLIGHT for r in m.recipients)]
            batch = Batch()
            entries: list[Message] = []
            split: dict[str, list[Message]] = {}
            for message in messages:
                owners: dict[int, list[Recipient]] = {}
                for recipient in message.recipients:
                    if not recipient.state.done:
                        owners.setdefault(shard_for_address(recipient.address, shards, excluded),
                                          []).append(recipient)
                if len(owners) == 1:
                    owner = next(iter(owners))
                    batch.flags[message.queue_id] = (message.warned, owner)
                    split[message.queue_id] = [message]
                    continue
                bodies = await self.io.read_bodies([message.queue_id])
                body = bodies.get(message.queue_id)
                if body is None:
                    continue
                parts = []
                for owner, recipients in owners.items():
                    part = Message(f"{message.queue_id}.{owner}", message.sender, message.arrival,
                                   [_renumbered(i, r) for i, r in enumerate(recipients)], message.size,
                                   dict(message.client), message.warned, forward_shard=owner)
                    batch.add_message(part, body)
                    parts.append(part)
                batch.removals.append(message.queue_id)
                split[message.queue_id] = parts
            if not batch:
                return
            await self.io.commit(batch)
            for message in messages:
                handed = split.get(message.queue_id)
                if handed is None:
                    continue
                self.scheduler.remove_message(message.queue_id)
                for entry in handed:
                    if entry is message:
                        message.forward_shard = batch.flags[message.queue_id][1]
                    entries.append(entry)
                    log.info("%s: handed to the outbox for shard %d (%d recipients; drain of shard %d)",
                             entry.queue_id, entry.forward_shard,
                             sum(1 for r in entry.recipients if not r.state.done), self.index)
        for entry in entries:
            self.outbox.add(entry)
        self.moved += len(messages)
        metrics.DRAIN_MOVED.labels(self.label).inc(len(messages))

    async def watch_peers(self, context: zmq.asyncio.Context) -> None:
        """While not serving, learn every PEER_POLL seconds which other shards are not serving either."""
        keys = cluster_keys(self.config.bus)
        links: list[BusLink] = links_to(list(self.config.queue.shards), keys, context=context)
        for link in links:
            link.start()
        self._links = links
        others = [link for i, link in enumerate(links) if i != self.index]
        indices = [i for i in range(len(links)) if i != self.index]
        try:
            while True:
                if self.state != SERVING and others:
                    answers = await ask_all(others, lambda req: AdminRequest(req=req, op="ping"), PEER_POLL * 2)
                    not_serving = set(self.others_not_serving)
                    for index, answer in zip(indices, answers, strict=True):
                        if isinstance(answer, AdminReply) and answer.ok and isinstance(answer.data, dict):
                            if answer.data.get("state", SERVING) == SERVING:
                                not_serving.discard(index)
                            else:
                                not_serving.add(index)
                    self.others_not_serving = frozenset(not_serving)
                await asyncio.sleep(PEER_POLL)
        finally:
            self._links = []
            for link in links:
                await link.close()

    # -- receiving --------------------------------------------------------------------------------------------

    async def trim_journal(self, now: float) -> None:
        """Forget the received keys whose senders confirmed, and those older than queue.max_lifetime."""
        try:
            dropped = await asyncio.to_thread(self.journal.trim, now)
        except OSError as exc:
            log.error("shard %d: cannot trim the journal of received transfers (will try again): %s",
                      self.index, exc)
        else:
            if dropped:
                log.info("shard %d: forgot %d received transfer keys (confirmed by their senders or older than "
                         "queue.max_lifetime); %d kept", self.index, dropped, len(self.journal))
            metrics.TRANSFER_JOURNAL.labels(self.label).set(len(self.journal))
        finally:
            self._trimming = False

    async def receive(self, transfer: Transfer, refuse_below_free: Callable[[], bool]) -> Stored | InjectRefused:
        key = f"{transfer.queue_id}#{transfer.hops}"
        while (pending := self._receiving.get(key)) is not None:
            await asyncio.shield(pending)
        if (key in self.journal or transfer.queue_id in self.scheduler.messages
                or transfer.queue_id in self.outbox.messages):
            metrics.TRANSFERS.labels(self.label, "duplicate").inc()
            log.info("%s: transfer %s seen before: answered Stored again, nothing stored", transfer.queue_id, key)
            return Stored(transfer.req, transfer.queue_id)
        if refuse_below_free():
            metrics.TRANSFERS.labels(self.label, "refused").inc()
            return InjectRefused(transfer.req, 452, "4.3.1", "Insufficient system storage")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._receiving[key] = done
        try:
            message = message_of(transfer)
            try:
                await self.io.commit(Batch(stores=[message], bodies={message.queue_id: transfer.body}))
            except SpoolError as exc:
                metrics.TRANSFERS.labels(self.label, "refused").inc()
                log.error("shard %d: cannot store transfer %s: %s", self.index, key, exc)
                if exc.disk_full:
                    return InjectRefused(transfer.req, 452, "4.3.1", "Insufficient system storage")
                return InjectRefused(transfer.req, 451, "4.3.0", "Queue storage failed, try again")
            await asyncio.to_thread(self.journal.add, key, self.clock())
            metrics.TRANSFER_JOURNAL.labels(self.label).set(len(self.journal))
            self._on_stored(message)
        finally:
            del self._receiving[key]
            done.set_result(None)
        metrics.TRANSFERS.labels(self.label, "received").inc()
        log.info("%s: received from shard %s with its state (%d recipients, hop %d)", message.queue_id,
                 message.client.get("transferred_from", "?"), len(message.recipients), transfer.hops)
        return Stored(transfer.req, transfer.queue_id)


def _renumbered(number: int, recipient: Recipient) -> Recipient:
    return Recipient(number, recipient.address, recipient.state, recipient.attempts, recipient.next_attempt,
                     recipient.last)

