"""The accounts' decisions (cluster.accounts.policy) as one session check of the frontend (cluster.frontend.policy).

`AccountChecks` answers the session's hooks:
- check_auth: 421 4.7.0 while the client address is blocked for failed AUTH (counted cluster-wide);
- check_login: a failed login is logged with why (unknown_user, bad_password, disabled: the client hears the
  same 535 5.7.8 for all three) and counted at the address's shard; 421 when that failure blocks the address;
- check_mail: sender_login_match and the daily message limit for a user; sender domain and SPF for a client
  that is neither authenticated nor in relay_networks (the SPF verdict's Received-SPF header goes into
  `facts.trace_headers`, which the session prepends to the stored message);
- check_rcpt: the daily recipient limit for a user; that local-transport recipients exist for other clients;
- check_message: records the message in the user's daily count (the entry id goes into `facts.reservation`);
- message_stored: takes the entry back when the message was not stored after all.
`ShardsLater` lets the checks be built with the listeners, before the frontend has its shard client.
"""

from __future__ import annotations

import logging

from cluster.accounts.policy import AccountPolicy
from cluster.bus.schemas import BusMessage
from cluster.frontend.injector import ShardClient
from cluster.frontend.policy import SessionFacts, SessionPolicy
from cluster.smtp.address import Address
from cluster.smtp.events import MessageReceived
from cluster.smtp.replies import Reply
from cluster.users import AuthOutcome, UsersFileError

log = logging.getLogger(__name__)


class ShardsLater:
    """The frontend's shard client, given once it exists (`bind`); until then every question goes unanswered.
    The shard list and the shards not serving are the client's, so a SIGHUP reload and a drain count too."""

    def __init__(self, shards: list[str]) -> None:
        self._shards = shards
        self._client: ShardClient | None = None

    @property
    def shards(self) -> list[str]:
        return self._client.shards if self._client is not None else self._shards

    @property
    def excluded(self) -> frozenset[int]:
        return self._client.excluded if self._client is not None else frozenset()

    def bind(self, client: ShardClient) -> None:
        self._client = client

    async def ask(self, shard: int, message: BusMessage) -> BusMessage | None:
        if self._client is None:
            return None
        return await self._client.ask(shard, message)


class AccountChecks(SessionPolicy):
    def __init__(self, policy: AccountPolicy) -> None:
        self.policy = policy

    async def check_auth(self, facts: SessionFacts) -> Reply | None:
        return await self.policy.auth_blocked(facts.client_ip)

    async def check_login(self, facts: SessionFacts, username: str, verified: bool) -> Reply | None:
        if verified:
            return None
        log.info("authentication failed user=%s client=%s reason=%s", username, facts.client_ip,
                 self._why(username).value)
        return await self.policy.auth_failed(facts.client_ip)

    def _why(self, username: str) -> AuthOutcome:
        """Why a login whose password check failed did fail (the session only knows it did)."""
        users = self.policy.users
        try:
            account = users.get(username) if users is not None else None
        except UsersFileError:
            return AuthOutcome.UNKNOWN_USER
        if account is None:
            return AuthOutcome.UNKNOWN_USER
        return AuthOutcome.BAD_PASSWORD if account.active else AuthOutcome.DISABLED

    async def check_mail(self, facts: SessionFacts, sender: Address | None,
                         params: dict[str, str | None]) -> Reply | None:
        decision = await self.policy.check_mail(user=facts.user, may_relay=facts.trusted_network,
                                                client_ip=facts.client_ip, helo=facts.helo or "",
                                                sender="" if sender is None else str(sender))
        facts.trace_headers = [decision.spf.header_field()] if decision.spf is not None else []
        return decision.refusal

    def settles_rcpt(self, facts: SessionFacts) -> bool:
        return not self.policy.asks_at_rcpt(facts.user, facts.trusted_network)

    async def check_rcpt(self, facts: SessionFacts, recipient: Address) -> Reply | None:
        if not self.policy.asks_at_rcpt(facts.user, facts.trusted_network):
            return None
        return await self.policy.check_rcpt(user=facts.user, may_relay=facts.trusted_network,
                                            client_ip=facts.client_ip, recipient=str(recipient),
                                            accepted=len(facts.recipients))

    async def check_message(self, facts: SessionFacts, message: MessageReceived) -> Reply | None:
        if facts.user is None:
            return None
        refusal, facts.reservation = await self.policy.reserve(facts.user, len(message.recipients))
        return refusal

    async def message_stored(self, facts: SessionFacts, stored: bool) -> None:
        if not stored and facts.reservation and facts.user is not None:
            await self.policy.release(facts.user, facts.reservation)
        facts.reservation = ""
