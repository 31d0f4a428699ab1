"""The `local` transport: LMTP (RFC 2033) to the mailbox node that owns each recipient's Maildir.

`LocalDelivery(config, cache).deliver(sender, recipients, body)` groups the recipients by owning node
(`cluster.mailbox.ownership`: rendezvous hashing of the mailbox name over `mailbox.nodes`) and runs one LMTP
transaction per group of at most `delivery.max_recipients_per_transaction`, with the SMTP client session of
`cluster.delivery.session` in LMTP mode and connections reused through the worker's `ConnectionCache`.
It returns a `LocalResult` per recipient: the node's own reply for that recipient (RFC 2033 4.2: 250 only
once the message is fsynced in that Maildir; 452 4.2.2 over quota; 552 5.2.2 larger than the quota), or,
when the node could not be used (refused, timed out, TLS failure, died before answering), the reason with
`host_failed` set, which the caller turns into a deferral.

Encryption (ARCHITECTURE.md contract 5): a node on loopback is spoken to in plain text; any other node must
offer STARTTLS, and its certificate is checked against `mailbox.node_ca_file` when that is set (else the
connection is encrypted without checking whom it reaches: the NetworkPolicy restricts LMTP to workers).
Failure modes: never raises for anything a node does; a local part that cannot be a mailbox fails at once
(550 5.1.3), without a connection.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.config import Config, is_loopback_host, split_host_port
from cluster.delivery import metrics
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.mx import Target
from cluster.delivery.session import HostUnavailable, SessionSettings, SmtpSession
from cluster.mailbox.maildir import MailboxNameError
from cluster.mailbox.ownership import node_for_localpart
from cluster.smtp import replies
from cluster.smtp.replies import Reply
from cluster.tls import cluster_client_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalResult:
    reply: Reply
    remote: str
    # True when no reply of the node decided this recipient (the node was unusable): report it as a deferral.
    host_failed: bool = False


def node_targets(nodes: Sequence[str]) -> list[Target]:
    targets = []
    for node in nodes:
        host, port = split_host_port(node)
        targets.append(Target(name=host, address=host, port=port))
    return targets


class LocalDelivery:
    def __init__(self, config: Config, cache: ConnectionCache) -> None:
        self._config = config
        self._cache = cache
        self._nodes = config.mailbox.nodes
        self.targets = node_targets(self._nodes)
        d = config.delivery
        helo = d.helo_name or config.smtp.hostname
        smtp = SessionSettings.from_config(d, helo)
        self._plain = dataclasses.replace(smtp, tls_mode="none", lmtp=True)
        # "verify" makes STARTTLS mandatory; the context decides what is checked (cluster_client_context).
        self._secure = dataclasses.replace(smtp, tls_mode="verify", lmtp=True,
                                           ssl_context=cluster_client_context(config.mailbox.node_ca_file))
        self._chunk = d.max_recipients_per_transaction
        for outcome in metrics.LMTP_OUTCOMES:
            metrics.LMTP.labels(outcome=outcome)  # every series exists from the start, at 0

    def settings_for(self, target: Target) -> SessionSettings:
        """Plain LMTP to a node on loopback; anywhere else STARTTLS is required (ARCHITECTURE.md contract 5)."""
        return self._plain if is_loopback_host(target.address) else self._secure

    async def deliver(self, sender: str, recipients: Sequence[str], body: bytes) -> dict[str, LocalResult]:
        results: dict[str, LocalResult] = {}
        by_node: dict[int, list[str]] = {}
        for recipient in recipients:
            try:
                node = node_for_localpart(recipient.rpartition("@")[0] or recipient, self._nodes)
            except MailboxNameError:
                results[recipient] = LocalResult(replies.BAD_MAILBOX_NAME, "")
                continue
            by_node.setdefault(node, []).append(recipient)
        for node, group in by_node.items():
            results.update(await self._deliver_to_node(self.targets[node], sender, group, body))
        for result in results.values():
            metrics.LMTP.labels(outcome=_outcome(result)).inc()
        return results

    async def _deliver_to_node(self, target: Target, sender: str, recipients: list[str],
                               body: bytes) -> dict[str, LocalResult]:
        decided: dict[str, LocalResult] = {}
        settings = self.settings_for(target)
        session: SmtpSession | None = self._cache.take(target)
        for start in range(0, len(recipients), self._chunk):
            chunk = recipients[start:start + self._chunk]
            try:
                if session is None:
                    session = await SmtpSession.open(target, settings)
                try:
                    result = await session.transaction(sender, chunk, body)
                except HostUnavailable as exc:
                    if not exc.stale:
                        raise
                    log.debug("cached LMTP connection to %s was stale; reconnecting", target.label)
                    session = await SmtpSession.open(target, settings)
                    result = await session.transaction(sender, chunk, body)
            except HostUnavailable as exc:
                log.warning("LMTP to mailbox node %s failed: %s", target.label, exc.reply)
                for recipient in recipients[start:]:
                    decided[recipient] = LocalResult(exc.reply, exc.remote, host_failed=True)
                return decided
            for recipient in chunk:
                decided[recipient] = LocalResult(result.replies[recipient], session.remote)
            if not session.usable:
                session = None
        if session is not None:
            self._cache.give_back(session)
        return decided


def _outcome(result: LocalResult) -> str:
    if result.host_failed:
        return "node_unavailable"
    code = result.reply.code
    return "delivered" if 200 <= code < 300 else "failed" if code >= 500 else "deferred"
