"""What the accounts add to an SMTP session, as decisions the session glue asks for at each step.

One `AccountPolicy` per frontend process; each method gets everything it needs as arguments (no session state
kept here) and returns the refusal to send, or None to go on:
- `auth_blocked(client_ip)` before an AUTH exchange: 421 4.7.0 while the client address has had
  `auth.max_failures_per_client` failures within `auth.failure_window`, counted cluster-wide at the shard owning
  the address (a frontend remembers a block it was told about until it ends; an unreachable shard: 454 4.7.0);
- `auth_failed(client_ip)`: one failed login, reported to the address's shard; 421 when it now blocks it;
- `check_mail(...)`: for an authenticated user, `auth.sender_login_match` (553 5.7.1) and the daily message
  limit (450 4.7.1); for a client on port 25 that is neither authenticated nor in relay_networks, the sender
  domain (`smtp.reject_unknown_sender_domain`) and SPF (`smtp.spf`); returns the SPF verdict for the header;
- `check_rcpt(...)`: the daily recipient limit for a user (450 4.7.1 at RCPT), local recipients for port 25;
- `reserve(user, recipients)` at the end of DATA, before the message is injected: the user's shard records
  the usage durably or refuses (450 4.7.1: another frontend took the last of the limit meanwhile);
  `release(entry_id)` when the message was not stored after all.
Limits: the user's own (users file) or `[limits]`; 0 = none (a user with neither limit is not counted).
The user's shard unreachable or silent: 451 4.3.0, never "allow". Every refusal logs one line (the session
counts it in mtacluster_smtp_messages_rejected{reason}). cluster.accounts.checks plugs this into the session.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

from cluster.accounts.recipients import LocalRecipients
from cluster.accounts.sender_domain import check_sender_domain
from cluster.accounts.spf import SpfChecker, SpfVerdict
from cluster.bus.ring import shard_for_key
from cluster.bus.schemas import AuthFailures, AuthStatus, BusMessage, Granted, Refused, Release, Reserve
from cluster.config import Config
from cluster.delivery.mx import MxResolver
from cluster.smtp import replies
from cluster.smtp.replies import Reply
from cluster.users import Account, UserDatabase, UsersFileError

log = logging.getLogger(__name__)


class ShardRequests(Protocol):
    """Ask one shard one question (the bus client of the frontend); None when no answer came in time.
    `excluded`: the shards that said they are draining or drained (the ring skips them, so counting goes to
    the new owner of a user's counters at once)."""

    @property
    def shards(self) -> list[str]: ...

    @property
    def excluded(self) -> frozenset[int]: ...

    async def ask(self, shard: int, message: BusMessage) -> BusMessage | None: ...


@dataclass(frozen=True)
class Limits:
    messages: int
    recipients: int

    @property
    def counted(self) -> bool:
        """A user without any limit is not counted (nothing to enforce: no round trip to its shard)."""
        return bool(self.messages or self.recipients)

    def describe(self, reason: str) -> str:
        if reason == "messages":
            return f"{self.messages} messages per 24 hours"
        return f"{self.recipients} recipients per 24 hours"


@dataclass(frozen=True)
class MailDecision:
    refusal: Reply | None = None
    spf: SpfVerdict | None = None


class AccountPolicy:
    def __init__(self, config: Config, users: UserDatabase | None, shards: ShardRequests,
                 resolver: MxResolver, recipients: LocalRecipients, spf: SpfChecker | None) -> None:
        self.config = config
        self.users = users
        self.shards = shards
        self.resolver = resolver
        self.recipients = recipients
        self.spf = spf
        self._blocked_until: dict[str, float] = {}

    # -- AUTH -------------------------------------------------------------------------------------------------

    async def auth_blocked(self, client_ip: str) -> Reply | None:
        auth = self.config.auth
        if auth.max_failures_per_client <= 0:
            return None
        until = self._blocked_until.get(client_ip)
        if until is not None:
            if time.monotonic() < until:
                return self._refuse("auth_blocked", replies.AUTH_BLOCKED, f"AUTH refused client={client_ip}: "
                                    "too many failed attempts")
            del self._blocked_until[client_ip]
        return await self._auth_failures(client_ip, 0)

    async def auth_failed(self, client_ip: str) -> Reply | None:
        """Count one failed AUTH of `client_ip`; the 421 to send when it is now blocked."""
        if self.config.auth.max_failures_per_client <= 0:
            return None
        refusal = await self._auth_failures(client_ip, 1)
        return None if refusal is replies.AUTH_CHECK_UNAVAILABLE else refusal

    async def _auth_failures(self, client_ip: str, failed: int) -> Reply | None:
        auth = self.config.auth
        shard = shard_for_key(client_ip, self.shards.shards, self.shards.excluded)
        answer = await self.shards.ask(shard, AuthFailures(0, client_ip, failed, float(auth.failure_window),
                                                           auth.max_failures_per_client))
        if not isinstance(answer, AuthStatus):
            log.warning("cannot ask shard %d about AUTH failures of client=%s: %r", shard, client_ip, answer)
            return self._refuse("auth_unavailable", replies.AUTH_CHECK_UNAVAILABLE,
                                f"AUTH deferred client={client_ip}: its shard {shard} did not answer")
        if answer.blocked_for > 0:
            self._blocked_until[client_ip] = time.monotonic() + answer.blocked_for
            return self._refuse("auth_blocked", replies.AUTH_BLOCKED,
                                f"AUTH refused client={client_ip}: {answer.failures} failed attempts, blocked for "
                                f"{answer.blocked_for:.0f}s")
        return None

    # -- MAIL and RCPT ----------------------------------------------------------------------------------------

    def account(self, name: str) -> Account | None:
        if self.users is None:
            return None
        try:
            return self.users.get(name)
        except UsersFileError as exc:
            log.warning("cannot read the users file: %s", exc)
            return None

    def limits(self, account: Account | None) -> Limits:
        defaults = self.config.limits
        if account is None:
            return Limits(defaults.messages_per_day, defaults.recipients_per_day)
        return Limits(defaults.messages_per_day if account.messages_per_day is None else account.messages_per_day,
                      defaults.recipients_per_day if account.recipients_per_day is None
                      else account.recipients_per_day)

    async def check_mail(self, *, user: str | None, may_relay: bool, client_ip: str, helo: str,
                         sender: str) -> MailDecision:
        if user is not None:
            account = self.account(user)
            if self.config.auth.sender_login_match and sender and (account is None or not account.may_send_as(sender)):
                return MailDecision(self._refuse("sender_not_owned", replies.sender_not_owned(user),
                                                 f"MAIL FROM:<{sender}> refused user={user} client={client_ip}: "
                                                 "not one of the user's addresses"))
            return MailDecision(await self._check_limit(user, account, 1, 0))
        if may_relay:
            return MailDecision()
        domain = sender.rpartition("@")[2]
        if self.config.smtp.reject_unknown_sender_domain and sender and domain:
            refusal = await check_sender_domain(self.resolver, domain)
            if refusal is not None:
                reason = "sender_domain_tempfail" if refusal.code < 500 else "unknown_sender_domain"
                return MailDecision(self._refuse(reason, refusal, f"MAIL FROM:<{sender}> refused "
                                                 f"client={client_ip}: {refusal}"))
        if self.spf is None:
            return MailDecision()
        verdict = await self.spf.check(client_ip, sender, helo)
        if verdict.result == "temperror":
            return MailDecision(self._refuse("spf_temperror", replies.SPF_TEMPERROR,
                                             f"MAIL FROM:<{sender}> deferred client={client_ip}: SPF temperror "
                                             f"({verdict.explanation})"), verdict)
        if verdict.result == "fail" and self.config.smtp.spf == "reject":
            return MailDecision(self._refuse("spf_fail", replies.spf_fail(verdict.explanation or "not permitted"),
                                             f"MAIL FROM:<{sender}> refused client={client_ip}: SPF fail"), verdict)
        return MailDecision(None, verdict)

    @staticmethod
    def asks_at_rcpt(user: str | None, may_relay: bool) -> bool:
        """Whether `check_rcpt` has anything to check: a user's daily recipient limit, or whether the recipient
        of a client outside the relay networks exists. A trusted client without AUTH, as a bulk sender in
        smtp.relay_networks is, needs no question per recipient (so no coroutine and no address text either)."""
        return user is not None or not may_relay

    async def check_rcpt(self, *, user: str | None, may_relay: bool, client_ip: str, recipient: str,
                         accepted: int) -> Reply | None:
        """`accepted`: recipients already accepted in this transaction."""
        if user is not None:
            return await self._check_limit(user, self.account(user), 1, accepted + 1)
        if not self.asks_at_rcpt(user, may_relay):
            return None
        refusal = self.recipients.check(recipient)
        if refusal is not None:
            reason = "unknown_recipient" if refusal.code >= 500 else "recipient_check_unavailable"
            return self._refuse(reason, refusal, f"RCPT TO:<{recipient}> refused client={client_ip}: {refusal}")
        return None

    async def _check_limit(self, user: str, account: Account | None, messages: int, recipients: int) -> Reply | None:
        limits = self.limits(account)
        if not limits.counted:
            return None
        answer = await self._reserve(user, limits, messages, recipients, "")
        return answer if isinstance(answer, Reply) else None

    # -- end of DATA --------------------------------------------------------------------------------------------

    async def reserve(self, user: str, recipients: int) -> tuple[Reply | None, str]:
        """Record one message of `recipients` recipients for `user` before it is injected: (refusal, entry id)."""
        limits = self.limits(self.account(user))
        if not limits.counted:
            return None, ""
        entry_id = f"{user.lower()}.{secrets.token_hex(8)}"
        answer = await self._reserve(user, limits, 1, recipients, entry_id)
        if isinstance(answer, Reply):
            return answer, ""
        return None, entry_id

    async def release(self, user: str, entry_id: str) -> None:
        """The message counted under `entry_id` was not stored: take it back (best effort; logged)."""
        shard = shard_for_key(user, self.shards.shards, self.shards.excluded)
        answer = await self.shards.ask(shard, Release(0, entry_id))
        if answer is None or answer.TYPE != "released":
            log.warning("could not release usage entry %s of user=%s on shard %d: it stays counted", entry_id,
                        user, shard)

    async def _reserve(self, user: str, limits: Limits, messages: int, recipients: int,
                       entry_id: str) -> Reply | Granted:
        shard = shard_for_key(user, self.shards.shards, self.shards.excluded)
        answer = await self.shards.ask(shard, Reserve(0, user.lower(), messages, recipients, limits.messages,
                                                      limits.recipients, entry_id))
        if isinstance(answer, Granted):
            return answer
        if isinstance(answer, Refused):
            return self._refuse("daily_limit", replies.daily_limit_reached(limits.describe(answer.reason)),
                                f"user={user} over the daily limit of {limits.describe(answer.reason)} "
                                f"({answer.messages_used} messages, {answer.recipients_used} recipients in 24h)")
        return self._refuse("limits_unavailable", replies.LIMITS_UNAVAILABLE,
                            f"user={user}: the shard {shard} keeping the daily counters did not answer: {answer!r}")

    @staticmethod
    def _refuse(reason: str, reply: Reply, line: str) -> Reply:
        """Log one line for a refusal (the session counts it in mtacluster_smtp_messages_rejected{reason})."""
        log.info("%s reason=%s reply=%s", line, reason, reply)
        return reply
