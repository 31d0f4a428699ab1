"""Which recipients exist: a check for clients on port 25 (neither authenticated nor in relay_networks).

A recipient whose domain is routed to the `local` transport (`delivery.transports`, cluster.delivery.routing)
must be a user of the users file (its name, one of its full addresses, or, for a user named without a domain,
that name as the local part), an alias of `[aliases]`, or postmaster@ of the domain (RFC 5321 4.5.1: always
deliverable). Anything else gets 550 5.1.1 at RCPT, so unknown users are refused in the session instead of
being bounced later (backscatter). Recipients of other domains are not checked here (the relay policy decides).
Failure modes: an unreadable users file gives 451 4.3.0 (the client retries), never a silent accept.
"""

from __future__ import annotations

from collections.abc import Mapping

from cluster.bus.ring import domain_key
from cluster.delivery.routing import Router
from cluster.smtp import replies
from cluster.smtp.replies import Reply
from cluster.users import UserDatabase, UsersFileError


class LocalRecipients:
    def __init__(self, router: Router, users: UserDatabase | None, aliases: Mapping[str, tuple[str, ...]]) -> None:
        self._router = router
        self._users = users
        self._aliases = {_normal(alias) for alias in aliases}

    def is_local(self, domain: str) -> bool:
        entry = self._router.table_entry(domain)
        return entry is not None and entry.strip() == "local"

    def check(self, address: str) -> Reply | None:
        """None when `address` may receive mail here (or is not ours to check), else the refusal."""
        local, at, domain = address.rpartition("@")
        if not at or not self.is_local(domain):
            return None
        if local.lower() == "postmaster" or _normal(address) in self._aliases:
            return None
        try:
            if self._users is not None and self._users.receives(address):
                return None
        except UsersFileError:
            return replies.RECIPIENT_CHECK_UNAVAILABLE
        return replies.unknown_recipient(address)


def _normal(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local.lower()}@{domain_key(domain)}"
