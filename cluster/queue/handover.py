"""The owned state a draining shard hands to its new owners besides its queue, exactly once (issue 14).

Two kinds of state are owned by a shard on the ring (ARCHITECTURE.md contract 7) and move with a drain:
- suppression entries (cluster.queue.suppression), owned by the shard of the address's domain;
- per-user sending counters (cluster.queue.usage, served by accounts.py), owned by the shard of the user name
  (`shard_for_key`).
Shaping state is derived from configuration and recent replies, and failed-AUTH counts are short-lived and in
memory only: the new owner rebuilds both.

Sending (`hand_over(links, shards, excluded)`): the entries are grouped by their owner on the ring without the
shards that are not serving, and sent as the admin operations `suppression_import` / `usage_import`; an entry
is deleted here only after its owner answered that it has it. It runs from the first tick of a drain (so the
new owner counts a user's mail against the right total from the start, not only once the queue has moved) and
again whenever an entry is left (a Reserve from a frontend that had not yet heard of the drain).
Receiving (`import_suppression`, `import_usage`): an entry is stored as it is (since/until; time and counts),
committed before the answer. Both are idempotent (an address is replaced by the same entry; a usage entry id
already held is skipped, and the spool inserts it OR IGNORE), so a resend after a crash of either side
neither loses nor doubles an entry.

Inputs: the shard index, the suppression list (None when off), the usage ledger and the spool commit.
Outputs: the moved entries, one log line per owner and kind, the answer data of the imports.
Failure modes: an owner that does not answer (or refuses) keeps the entries here, and the next tick tries
again; an import that is not a list of entries raises HandoverError (answered as a refused admin request);
a spool error on either side raises SpoolError (the sender keeps its entries).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from cluster.bus.client import BusLink, NoAnswer
from cluster.bus.ring import shard_for_address, shard_for_key
from cluster.bus.schemas import AdminReply, AdminRequest
from cluster.queue import metrics
from cluster.queue.spool import Batch
from cluster.queue.suppression import Entry, SuppressionList
from cluster.queue.usage import UsageEntry, UsageLedger

log = logging.getLogger("mtacluster.queue")
T = TypeVar("T")

# The admin operations this module answers.
IMPORT_OPS = ("suppression_import", "usage_import")
# Seconds a new owner gets to answer one import.
IMPORT_TIMEOUT = 5.0
# Entries sent in one import request.
IMPORT_BATCH = 1000


class HandoverError(ValueError):
    """An import whose arguments are not a list of entries of its kind."""


class Handover:
    def __init__(self, index: int, suppression: SuppressionList | None, usage: UsageLedger,
                 commit: Callable[[Batch], Awaitable[None]]) -> None:
        self.index = index
        self.label = str(index)
        self.suppression = suppression
        self.usage = usage
        self._commit = commit
        self._lock = asyncio.Lock()

    def left(self) -> int:
        """Entries still to hand over."""
        return (len(self.suppression) if self.suppression is not None else 0) + len(self.usage)

    # -- sending ----------------------------------------------------------------------------------------------

    async def hand_over(self, links: Sequence[BusLink], shards: Sequence[str], excluded: frozenset[int]) -> bool:
        """Send every entry to its new owner; True when none is left here."""
        async with self._lock:
            if not self.left():
                return True
            if not links:
                return False
            complete = await self._hand_over_usage(links, shards, excluded)
            complete = await self._hand_over_suppression(links, shards, excluded) and complete
            return complete and not self.left()

    async def _hand_over_suppression(self, links: Sequence[BusLink], shards: Sequence[str],
                                     excluded: frozenset[int]) -> bool:
        if self.suppression is None or not len(self.suppression):
            return True
        owners: dict[int, list[Entry]] = {}
        for entry in self.suppression.entries(time.time()):
            owners.setdefault(shard_for_address(entry.address, shards, excluded), []).append(entry)
        complete = True
        for owner, entries in owners.items():
            for start in range(0, len(entries), IMPORT_BATCH):
                part = entries[start:start + IMPORT_BATCH]
                if not await self._send(links, owner, "suppression_import", [dataclasses.asdict(e) for e in part]):
                    complete = False
                    break
                for entry in part:
                    self.suppression.remove(entry.address)
                metrics.HANDED_OVER.labels(self.label, "suppression").inc(len(part))
                log.info("shard %d: %d suppression entries handed to shard %d", self.index, len(part), owner)
        return complete

    async def _hand_over_usage(self, links: Sequence[BusLink], shards: Sequence[str],
                               excluded: frozenset[int]) -> bool:
        owners: dict[int, list[UsageEntry]] = {}
        for entry in self.usage.entries():
            owners.setdefault(shard_for_key(entry.user, shards, excluded), []).append(entry)
        complete = True
        for owner, entries in owners.items():
            for start in range(0, len(entries), IMPORT_BATCH):
                part = entries[start:start + IMPORT_BATCH]
                if owner == self.index or not await self._send(links, owner, "usage_import",
                                                               [dataclasses.asdict(e) for e in part]):
                    complete = False
                    break
                # Deleted here only now that the owner has them committed: a crash in between resends them,
                # and the owner skips the ids it holds.
                await self._commit(Batch(usage_removals=[e.entry_id for e in part]))
                for entry in part:
                    self.usage.remove(entry.entry_id)
                metrics.HANDED_OVER.labels(self.label, "usage").inc(len(part))
                metrics.USAGE_ENTRIES.labels(self.label).set(len(self.usage))
                log.info("shard %d: %d usage entries (users %s) handed to shard %d", self.index, len(part),
                         ", ".join(sorted({e.user for e in part})[:5]), owner)
        return complete

    async def _send(self, links: Sequence[BusLink], owner: int, op: str, entries: list[dict[str, Any]]) -> bool:
        if owner >= len(links):
            return False
        try:
            reply = await links[owner].request(functools.partial(_admin_request, op, {"entries": entries}),
                                               IMPORT_TIMEOUT)
        except NoAnswer as missing:
            log.warning("shard %d: %s to shard %d not done yet: %s", self.index, op, owner, missing)
            return False
        if not (isinstance(reply, AdminReply) and reply.ok):
            log.warning("shard %d: shard %d did not take the %s: %s", self.index, owner, op, reply)
            return False
        return True

    # -- receiving --------------------------------------------------------------------------------------------

    def import_suppression(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.suppression is None or not isinstance(args.get("entries"), list):
            raise HandoverError("suppression_import needs a list of entries and suppression on")
        parsed = _entries(args["entries"], Entry, "suppression", lambda entry: (
            isinstance(entry.address, str) and isinstance(entry.until, int | float)
            and isinstance(entry.since, int | float)))
        for entry in parsed:
            self.suppression.add(entry.address, str(entry.category), str(entry.reply), float(entry.since),
                                 float(entry.until) - float(entry.since))
        log.info("shard %d: imported %d suppression entries from a drained shard", self.index, len(parsed))
        return {"shard": self.index, "imported": len(parsed)}

    async def import_usage(self, args: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(args.get("entries"), list):
            raise HandoverError("usage_import needs a list of entries")
        parsed = [dataclasses.replace(entry, user=entry.user.lower(), at=float(entry.at))
                  for entry in _entries(args["entries"], UsageEntry, "usage", lambda entry: bool(
                      isinstance(entry.entry_id, str) and entry.entry_id and isinstance(entry.user, str)
                      and isinstance(entry.at, int | float) and isinstance(entry.messages, int)
                      and isinstance(entry.recipients, int)))]
        new = [entry for entry in parsed if entry.entry_id not in self.usage]
        for entry in new:
            self.usage.add(entry)  # counted at once, like a Reserve: racing reservations see it
        if new:
            try:
                await self._commit(Batch(usage_adds=new))
            except BaseException:
                for entry in new:
                    self.usage.remove(entry.entry_id)
                raise
        metrics.USAGE_ENTRIES.labels(self.label).set(len(self.usage))
        log.info("shard %d: imported %d usage entries from a drained shard (%d held already)", self.index,
                 len(new), len(parsed) - len(new))
        return {"shard": self.index, "imported": len(new), "held": len(parsed) - len(new)}


def _entries(items: list[Any], make: Callable[..., T], kind: str, well_formed: Callable[[T], bool]) -> list[T]:
    """The entries of an import, each built from its fields and checked; HandoverError names the first that is
    not an entry of `kind`."""
    entries = []
    for item in items:
        try:
            entry = make(**item)
        except TypeError:
            raise HandoverError(f"not a {kind} entry: {item!r}") from None
        if not well_formed(entry):
            raise HandoverError(f"not a {kind} entry: {item!r}")
        entries.append(entry)
    return entries


def _admin_request(op: str, args: dict[str, Any], req: int) -> AdminRequest:
    return AdminRequest(req=req, op=op, args=args)
