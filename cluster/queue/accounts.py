"""The shard side of accounts: per-user daily sending counters and failed-AUTH counts per client address.

Serves, for the users and client addresses this shard owns on the ring (cluster/bus/schemas.py documents the
messages): Reserve -> Granted/Refused, Release -> Released, AuthFailures -> AuthStatus, and the admin op
"user_usage". Counters live in a `UsageLedger` (cluster.queue.usage), loaded from the spool at start; a
Reserve with an entry id is counted in memory at once (racing reservations see each other: exact across any
number of frontends) and answered Granted only after the spool transaction holding it committed (group commit,
fsync), so a count survives a restart and kill -9. Entries that left the 24-hour window are deleted from the
spool by `prune`. AUTH failures are in memory only (cluster.queue.auth_failures).
Failure modes: a spool error while recording takes the entry back and answers Error (the frontend says 451
4.3.0 to its client and nothing is sent); a Release for an unknown entry answers Released(found=False).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from cluster.bus.schemas import (
    AuthFailures,
    AuthStatus,
    BusMessage,
    Error,
    Granted,
    Refused,
    Release,
    Released,
    Reserve,
)
from cluster.queue import metrics
from cluster.queue.auth_failures import AuthFailureCounter
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.usage import UsageEntry, UsageLedger

log = logging.getLogger("mtacluster.queue")


class AccountCounters:
    def __init__(self, label: str, commit: Callable[[Batch], Awaitable[None]], clock: Callable[[], float]) -> None:
        self.label = label
        self._commit = commit
        self._clock = clock
        self.ledger = UsageLedger()
        self.auth_failures = AuthFailureCounter()

    def load(self, entries: list[UsageEntry]) -> None:
        for entry in entries:
            self.ledger.add(entry)
        metrics.USAGE_ENTRIES.labels(self.label).set(len(self.ledger))

    async def handle(self, message: BusMessage) -> BusMessage:
        """The answer to one accounts message."""
        if isinstance(message, Reserve):
            return await self._reserve(message)
        if isinstance(message, Release):
            return await self._release(message)
        if isinstance(message, AuthFailures):
            return self._auth_failures(message)
        return Error(f"not an accounts message: {message.TYPE}")

    async def _reserve(self, request: Reserve) -> BusMessage:
        now = self._clock()
        reason = self.ledger.fits(request.user, request.messages, request.recipients, request.max_messages,
                                  request.max_recipients, now)
        if reason is not None:
            metrics.USER_LIMIT_REFUSALS.labels(self.label, request.user.lower(), reason).inc()
            used = self.ledger.usage(request.user, now)
            log.info("user=%s daily limit of %s reached (%d messages, %d recipients in 24h)", request.user, reason,
                     *used)
            return Refused(request.req, reason, *used)
        if request.entry_id and request.entry_id not in self.ledger:
            entry = UsageEntry(request.entry_id, request.user.lower(), now, request.messages, request.recipients)
            self.ledger.add(entry)
            try:
                await self._commit(Batch(usage_adds=[entry]))
            except SpoolError as exc:
                self.ledger.remove(entry.entry_id)
                log.error("cannot record the usage of user=%s: %s", request.user, exc)
                return Error(f"cannot record the usage: {exc}")
            metrics.USAGE_ENTRIES.labels(self.label).set(len(self.ledger))
        return Granted(request.req, request.entry_id, *self.ledger.usage(request.user, now))

    async def _release(self, request: Release) -> BusMessage:
        entry = self.ledger.remove(request.entry_id)
        if entry is None:
            return Released(request.req, False)
        try:
            await self._commit(Batch(usage_removals=[entry.entry_id]))
        except SpoolError as exc:
            self.ledger.add(entry)
            return Error(f"cannot release the usage entry: {exc}")
        log.info("user=%s usage entry %s released (message not stored)", entry.user, entry.entry_id)
        metrics.USAGE_ENTRIES.labels(self.label).set(len(self.ledger))
        return Released(request.req, True)

    def _auth_failures(self, request: AuthFailures) -> AuthStatus:
        before = self.auth_failures.record(request.client_ip, 0, request.window, request.limit, self._clock())[1]
        failures, blocked_for = self.auth_failures.record(request.client_ip, request.failed, request.window,
                                                          request.limit, self._clock())
        if blocked_for > 0 and before == 0:
            metrics.AUTH_CLIENTS_BLOCKED.labels(self.label).inc()
            log.warning("client=%s blocked from AUTH for %.0fs after %d failed attempts", request.client_ip,
                        blocked_for, failures)
        return AuthStatus(request.req, failures, blocked_for)

    def usage(self, user: str) -> dict[str, int]:
        messages, recipients = self.ledger.usage(user, self._clock())
        return {"messages": messages, "recipients": recipients}

    async def prune(self) -> None:
        """Delete the entries that left the 24-hour window (from memory after the spool)."""
        expired = self.ledger.expired(self._clock())
        if not expired:
            return
        try:
            await self._commit(Batch(usage_removals=expired))
        except SpoolError as exc:
            log.error("cannot delete expired usage entries: %s", exc)
            return
        for entry_id in expired:
            self.ledger.remove(entry_id)
        metrics.USAGE_ENTRIES.labels(self.label).set(len(self.ledger))
