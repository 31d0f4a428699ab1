"""Session policy: what the frontend asks before it answers AUTH, MAIL, RCPT and end of DATA.

The SMTP session (`cluster.frontend.session`) owns the protocol; at each decision point it asks one
`SessionPolicy` (a `PolicyChain` of small checks, each with one job) and sends the first refusal any check
returns. Every hook is async (a check may ask DNS or a queue shard) and returns a `Reply` from
`cluster.smtp.replies` to refuse, or None to let the next check decide; when every check returns None the
session sends its positive reply.

    check_auth(facts)                         AUTH command, before the SASL exchange starts
    check_login(facts, username, verified)    the password was checked (verified: it was right); a Reply
                                              turns the outcome into that refusal (the session counts it as a
                                              failed AUTH when it is 5xx). Checks never see the password.
    check_mail(facts, sender, params)         MAIL FROM (sender None: the null reverse-path <>)
    check_rcpt(facts, recipient)              RCPT TO; `facts.sender` is the transaction's sender
    settles_rcpt(facts)                       (not async) True when check_rcpt would return None for any
                                              recipient of these facts without waiting: the session then
                                              accepts the RCPT without running the check (once per recipient)
    check_message(facts, message)             end of DATA, before the message is stored
    message_stored(facts, stored)             after the attempt to store it (stored: every shard said Stored);
                                              lets a check undo what it did at check_message

`SessionFacts` is what a check knows of the session: client address, listener, HELO name, TLS, the
authenticated user, relay rights, and the transaction so far. Checks must not change it, except the two
fields that are theirs: `trace_headers` (header fields to prepend to the stored message, e.g. Received-SPF) and
`reservation` (what check_message recorded, for message_stored); the session clears both with each transaction.

The checks here: `RelayPolicy` (ARCHITECTURE.md contract 5, no open relay: a recipient is accepted when its
domain is one of `smtp.local_domains`, or the client is inside `smtp.relay_networks`, or it authenticated;
else 554 5.7.1) and `SubmissionPolicy` (RFC 6409 4.3: on the submission listeners MAIL needs AUTH first,
530 5.7.0); the accounts' checks are cluster.accounts.checks. `rejection_reason(reply)` names each refusal for
the `mtacluster_smtp_messages_rejected` metric: by the reply itself, else by its code and enhanced code.
Failure modes: a check that raises is a bug; the session does not catch it (the connection closes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cluster.domains import domain_key
from cluster.smtp import replies
from cluster.smtp.address import Address
from cluster.smtp.events import MessageReceived
from cluster.smtp.replies import Reply

# The listener kinds (`smtp.listen`, `smtp.submission_listen`, `smtp.submissions_listen`): the metric label.
SMTP, SUBMISSION, SUBMISSIONS = "smtp", "submission", "submissions"
LISTENER_KINDS = (SMTP, SUBMISSION, SUBMISSIONS)

# Refusals by what the metric calls them; a refusal not listed counts as "policy".
REJECTION_REASONS: dict[Reply, str] = {
    replies.RELAY_DENIED: "relay_denied",
    replies.AUTH_REQUIRED: "auth_required",
    replies.LIMITS_UNAVAILABLE: "limits_unavailable",
    replies.RECIPIENT_CHECK_UNAVAILABLE: "recipient_check_unavailable",
}
# Refusals whose text varies (it names the user, address or domain), by code and enhanced code.
REJECTION_CODES: dict[tuple[int, str], str] = {
    (553, "5.7.1"): "sender_not_owned",
    (450, "4.7.1"): "daily_limit",
    (550, "5.1.1"): "unknown_recipient",
    (550, "5.1.8"): "unknown_sender_domain",
    (450, "4.1.8"): "sender_domain_tempfail",
    (550, "5.7.27"): "null_mx_sender_domain",
    (550, "5.7.23"): "spf_fail",
    (451, "4.7.24"): "spf_temperror",
}


def rejection_reason(reply: Reply) -> str:
    """The `reason` label of a policy refusal ("policy" when nothing more precise is known)."""
    return REJECTION_REASONS.get(reply) or REJECTION_CODES.get((reply.code, reply.enhanced), "policy")


@dataclass
class SessionFacts:
    """What the policy knows of one session; the session keeps it up to date, checks only read it."""

    client_ip: str
    listener: str = SMTP
    helo: str | None = None
    tls: bool = False
    # The SMTP AUTH user, once authenticated.
    user: str | None = None
    # The client address is inside smtp.relay_networks.
    trusted_network: bool = False
    # The current mail transaction: its sender (after an accepted MAIL) and the recipients accepted so far.
    sender: Address | None = None
    recipients: list[Address] = field(default_factory=list)
    # Written by checks (see above), cleared with each transaction.
    trace_headers: list[bytes] = field(default_factory=list)
    reservation: str = ""

    @property
    def may_relay(self) -> bool:
        return self.trusted_network or self.user is not None


class SessionPolicy:
    """One check. Every hook returns None (no objection); subclasses override the hooks they need."""

    async def check_auth(self, facts: SessionFacts) -> Reply | None:
        return None

    async def check_login(self, facts: SessionFacts, username: str, verified: bool) -> Reply | None:
        return None

    async def check_mail(self, facts: SessionFacts, sender: Address | None,
                         params: dict[str, str | None]) -> Reply | None:
        return None

    async def check_rcpt(self, facts: SessionFacts, recipient: Address) -> Reply | None:
        return None

    def settles_rcpt(self, facts: SessionFacts) -> bool:
        """True when `check_rcpt` returns None for every recipient of `facts` without waiting (it is then not
        asked). A check that has its own check_rcpt says when, by its own settles_rcpt; until it does, it is
        always asked."""
        return type(self).check_rcpt is SessionPolicy.check_rcpt

    async def check_message(self, facts: SessionFacts, message: MessageReceived) -> Reply | None:
        return None

    async def message_stored(self, facts: SessionFacts, stored: bool) -> None:
        return None


class PolicyChain(SessionPolicy):
    """Asks its checks in order; the first refusal wins."""

    def __init__(self, checks: Sequence[SessionPolicy]) -> None:
        self.checks = tuple(checks)

    async def check_auth(self, facts: SessionFacts) -> Reply | None:
        for check in self.checks:
            if (reply := await check.check_auth(facts)) is not None:
                return reply
        return None

    async def check_login(self, facts: SessionFacts, username: str, verified: bool) -> Reply | None:
        for check in self.checks:
            if (reply := await check.check_login(facts, username, verified)) is not None:
                return reply
        return None

    async def check_mail(self, facts: SessionFacts, sender: Address | None,
                         params: dict[str, str | None]) -> Reply | None:
        for check in self.checks:
            if (reply := await check.check_mail(facts, sender, params)) is not None:
                return reply
        return None

    async def check_rcpt(self, facts: SessionFacts, recipient: Address) -> Reply | None:
        for check in self.checks:
            if (reply := await check.check_rcpt(facts, recipient)) is not None:
                return reply
        return None

    def settles_rcpt(self, facts: SessionFacts) -> bool:
        for check in self.checks:  # noqa: SIM110 (a loop, not all() of a generator: it runs per RCPT)
            if not check.settles_rcpt(facts):
                return False
        return True

    async def check_message(self, facts: SessionFacts, message: MessageReceived) -> Reply | None:
        for check in self.checks:
            if (reply := await check.check_message(facts, message)) is not None:
                return reply
        return None

    async def message_stored(self, facts: SessionFacts, stored: bool) -> None:
        for check in self.checks:
            await check.message_stored(facts, stored)


_KNOWN_CLIENTS = 4096


class RelayPolicy(SessionPolicy):
    def __init__(self, relay_networks: Iterable[str], local_domains: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in relay_networks]
        self.local_domains = frozenset(domain_key(d) for d in local_domains)
        # client_may_relay's answers by client address (asked once per connection; parsing costs more than
        # the lookup). Bounded: emptied when it reaches _KNOWN_CLIENTS addresses.
        self._known: dict[str, bool] = {}

    def client_may_relay(self, client_ip: str) -> bool:
        known = self._known.get(client_ip)
        if known is None:
            if len(self._known) >= _KNOWN_CLIENTS:
                self._known.clear()
            known = self._known[client_ip] = self._in_relay_networks(client_ip)
        return known

    def _in_relay_networks(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == net.version and address in net for net in self.networks)

    def is_local(self, ascii_domain: str) -> bool:
        return domain_key(ascii_domain) in self.local_domains

    def check_recipient(self, client_may_relay: bool, ascii_domain: str) -> Reply | None:
        """None when the recipient is acceptable, else the refusal to send."""
        if client_may_relay or self.is_local(ascii_domain):
            return None
        return replies.RELAY_DENIED

    async def check_rcpt(self, facts: SessionFacts, recipient: Address) -> Reply | None:
        if facts.may_relay:  # before the domain's key is made: nothing to look up (once per recipient)
            return None
        return self.check_recipient(False, recipient.ascii_domain)

    def settles_rcpt(self, facts: SessionFacts) -> bool:
        return facts.may_relay


class SubmissionPolicy(SessionPolicy):
    """RFC 6409 4.3 / RFC 4954 6: the submission service takes no mail before AUTH (530 5.7.0)."""

    async def check_mail(self, facts: SessionFacts, sender: Address | None,
                         params: dict[str, str | None]) -> Reply | None:
        return replies.AUTH_REQUIRED if facts.user is None else None
