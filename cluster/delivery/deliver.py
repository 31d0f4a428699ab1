"""One delivery attempt of one job: route, resolve, talk SMTP (or LMTP), one `Outcome` per recipient.

`Deliverer.deliver(job) -> list[Outcome]` never raises for anything the network, DNS or the remote server
does: every recipient of the job gets exactly one Outcome, in the job's order.

- Recipients are grouped by domain and each group is routed (`cluster.delivery.routing`).
- SMTP routes: the targets come from `find_targets` (MX order, backup hosts). Hosts are tried in order within
  this attempt: a host that is unavailable (see `session.HostUnavailable`: refused, timeout, TLS failure, 421,
  4xx to greeting/EHLO/MAIL) or answers 4xx to every RCPT of a transaction passes the still-undecided
  recipients to the next host. Only when every host failed are they deferred, with the last host's words.
  A 5xx to RCPT fails that recipient, a 4xx to some RCPTs defers only those (they are not retried on another
  host in this attempt: the host is working, it just does not want them now).
- At most `max_recipients_per_transaction` recipients per transaction; more are sent in further transactions
  on the same connection. A message larger than the server's SIZE fails with 552 5.3.4 without being sent
  (RFC 1870 6.1).
- Connections come from and go back to the `ConnectionCache`; a cached one that turns out stale is replaced
  by one fresh connection.
- MTA-STS (RFC 8461, `cluster.delivery.mta_sts`), for domains routed by their own MX records: under an
  "enforce" policy only MX hosts the policy names are tried, over STARTTLS with a certificate that verifies for
  the MX name (connections cached apart from opportunistic ones); if none qualifies, or TLS fails, the
  recipients are deferred with 4.7.5. A "testing" policy changes nothing but logs what would have failed.
- Egress: each job leaves from the source the shard chose for it from its pool (Deliver.source;
  `cluster.delivery.egress`): connections are made from that source's address and say its EHLO name; cached
  connections are kept per source.
- Outcome kind (a `OutcomeKind`, never a string to parse): 2xx delivered, 4xx deferred, 5xx failed; `remote`
  and `port` name the host that answered; `connect_seconds` (DNS, hosts tried, session setup) and
  `transfer_seconds` (the SMTP transaction) feed the shard's log line (delays=a/b/c/d).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.bus.schemas import Deliver, Outcome, OutcomeKind
from cluster.config import Config
from cluster.delivery import metrics
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.egress import EgressChooser, Source
from cluster.delivery.lmtp import LocalDelivery
from cluster.delivery.mta_sts import MtaSts, Policy
from cluster.delivery.mx import DnsFailure, MxResolver, Target, find_targets
from cluster.delivery.routing import ErrorRoute, LocalRoute, Router, SmtpRoute
from cluster.delivery.session import (
    HostUnavailable,
    SessionSettings,
    SmtpSession,
    TransactionResult,
    client_ssl_context,
)
from cluster.domains import domain_key
from cluster.smtp.replies import NO_HOST_TRIED, Reply, smtputf8_unsupported, too_big_for_remote

log = logging.getLogger(__name__)


def outcome_from_reply(recipient: str, reply: Reply, remote: str, port: int = 0, connect_seconds: float = 0.0,
                       transfer_seconds: float = 0.0) -> Outcome:
    """The typed outcome of one reply: its code, enhanced status and text kept apart; with how long getting a
    session and the transaction took (the log's delays=.../c/d), when given."""
    if 200 <= reply.code < 300:
        kind = OutcomeKind.DELIVERED
    elif reply.is_permanent:
        kind = OutcomeKind.FAILED
    else:
        kind = OutcomeKind.DEFERRED  # 4xx, and anything odd (a 3xx where a final reply belongs): retry later
    enhanced = reply.enhanced or default_enhanced(reply.code)
    return Outcome(recipient=recipient, kind=kind, code=reply.code, enhanced=enhanced,
                   text=reply.text or str(reply.code), remote=remote, port=port,
                   connect_seconds=_seconds(connect_seconds), transfer_seconds=_seconds(transfer_seconds))


def timed(outcome: Outcome, connect_seconds: float, transfer_seconds: float) -> Outcome:
    """The outcome with how long getting a session and the transaction took (the log's delays=.../c/d)."""
    return dataclasses.replace(outcome, connect_seconds=_seconds(connect_seconds),
                               transfer_seconds=_seconds(transfer_seconds))


def _seconds(value: float) -> float:
    # Whole microseconds (as round(value, 6), for a fraction of its cost).
    return int(value * 1_000_000 + 0.5) / 1_000_000 if value > 0.0 else 0.0


def default_enhanced(code: int) -> str:
    """An enhanced code for a server that sent none (RFC 3463: X.0.0 = other/undefined)."""
    return f"{code // 100}.0.0" if code // 100 in (2, 4, 5) else "4.0.0"


def as_deferral(reply: Reply) -> Reply:
    """A reply that made a host unusable, reported as a deferral: a 5xx greeting or HELO refusal of one host
    is no reason to bounce mail that another host (or a later attempt) may take."""
    if not reply.is_permanent:
        return reply
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.0.0"
    return Reply(451, enhanced, reply.lines)


@dataclass
class _HostFailure:
    reply: Reply
    remote: str
    port: int


class Deliverer:
    def __init__(self, config: Config, resolver: MxResolver, cache: ConnectionCache,
                 rng: random.Random | None = None, settings: SessionSettings | None = None,
                 egress: EgressChooser | None = None, mta_sts: MtaSts | None = None,
                 sts_context: ssl.SSLContext | None = None) -> None:
        self._config = config
        self._delivery = config.delivery
        self._router = Router(config.delivery)
        self._top_domains = frozenset(config.metrics.top_domains)
        self._resolver = resolver
        self._cache = cache
        self._rng = rng or random.Random()
        helo = config.delivery.helo_name or config.smtp.hostname
        self._settings = settings or SessionSettings.from_config(config.delivery, helo)
        self._local = LocalDelivery(config, cache)
        self._egress = egress or EgressChooser(config.egress, self._rng)
        self._source_settings: dict[tuple[str, bool], SessionSettings] = {}
        self._sts = mta_sts
        self._sts_context = sts_context
        # How many TCP connections this deliverer opened (the cache's effect is visible in tests).
        self.connections_opened = 0

    @property
    def cache(self) -> ConnectionCache:
        return self._cache

    async def deliver(self, job: Deliver) -> list[Outcome]:
        by_domain: dict[str, list[str]] = {}
        keys: dict[str, str] = {}  # each spelling's domain key worked out once per job (100 recipients, 1 domain)
        for recipient in job.recipients:
            domain = recipient.rpartition("@")[2] or job.domain
            key = keys.get(domain)
            if key is None:
                key = keys[domain] = domain_key(domain)
            by_domain.setdefault(key, []).append(recipient)
        decided: dict[str, Outcome] = {}
        for domain, recipients in by_domain.items():
            for outcome in await self._deliver_domain(job, domain, recipients):
                decided[outcome.recipient] = outcome
        outcomes = [decided[recipient] for recipient in job.recipients]
        top = self._top_domains
        if len(outcomes) == 1:
            one = outcomes[0]
            metrics.attempt_counted(one.kind._value_, one.recipient.rpartition("@")[2], top, one.enhanced, one.code)
            return outcomes
        # Recipients with the same result counted together (a 100-recipient job: one increment, not 100).
        same = Counter((o.kind._value_, o.recipient.rpartition("@")[2], o.enhanced, o.code) for o in outcomes)
        for (kind, domain, enhanced, code), count in same.items():
            metrics.attempt_counted(kind, domain, top, enhanced, code, count)
        return outcomes

    async def _deliver_domain(self, job: Deliver, domain: str, recipients: list[str]) -> list[Outcome]:
        route = self._router.route(domain)
        if isinstance(route, ErrorRoute):
            reply = Reply.of(route.code, route.enhanced, route.text)
            return [outcome_from_reply(r, reply, "") for r in recipients]
        if isinstance(route, LocalRoute):
            return await self._deliver_local(job, recipients)
        return await self._deliver_smtp(job, route, recipients, domain)

    async def _deliver_local(self, job: Deliver, recipients: list[str]) -> list[Outcome]:
        """The `local` transport: LMTP to the mailbox node owning each recipient (`cluster.delivery.lmtp`)."""
        results = await self._local.deliver(job.sender, recipients, job.body)
        return [outcome_from_reply(recipient, as_deferral(result.reply) if result.host_failed else result.reply,
                                   result.remote)
                for recipient, result in ((r, results[r]) for r in recipients)]

    async def _deliver_smtp(self, job: Deliver, route: SmtpRoute, recipients: list[str],
                            domain: str = "") -> list[Outcome]:
        started = time.perf_counter()
        targets = await find_targets(self._resolver, route, self._delivery.max_mx_addresses, self._rng)
        if isinstance(targets, DnsFailure):
            reply = Reply.of(targets.code, targets.enhanced, targets.text)
            return [timed(outcome_from_reply(r, reply, ""), time.perf_counter() - started, 0.0) for r in recipients]
        enforce = False
        if self._sts is not None and route.mx_lookup and route.host.lower().rstrip(".") == domain:
            policy = await self._sts.policy(domain)
            if policy is not None:
                targets, refusal = self._apply_policy(domain, policy, targets)
                if refusal is not None:
                    return [timed(outcome_from_reply(r, refusal, ""), time.perf_counter() - started, 0.0)
                            for r in recipients]
                enforce = policy.mode == "enforce"
        decided: dict[str, Outcome] = {}
        pending = list(recipients)
        last_failure: _HostFailure | None = None
        source = self._egress.for_job(job.source, job.pool)
        for target in targets:
            pending, failure = await self._deliver_via(target, source, job, pending, decided, started, enforce)
            last_failure = failure or last_failure
            if not pending:
                break
        if pending and enforce and last_failure is not None and last_failure.reply.enhanced == "4.7.5":
            metrics.MTA_STS.labels(result="refused").inc()
        if pending:
            failure = last_failure or _HostFailure(NO_HOST_TRIED, "", 0)
            reply = as_deferral(failure.reply)
            spent = time.perf_counter() - started
            for recipient in pending:
                decided[recipient] = timed(outcome_from_reply(recipient, reply, failure.remote, failure.port), spent,
                                           0.0)
        return [decided[r] for r in recipients]

    @staticmethod
    def _apply_policy(domain: str, policy: Policy, targets: list[Target]) -> tuple[list[Target], Reply | None]:
        """The targets an MTA-STS policy lets us use, or the deferral when it lets us use none."""
        allowed = [t for t in targets if policy.allows(t.name)]
        refused = sorted({t.name for t in targets if t not in allowed})
        if policy.mode == "testing":
            if refused:
                metrics.MTA_STS.labels(result="testing_violation").inc()
                log.warning("MTA-STS policy of %s (testing) does not list MX %s; delivering anyway", domain,
                            ",".join(refused))
            return targets, None
        metrics.MTA_STS.labels(result="enforced").inc()
        if not allowed:
            metrics.MTA_STS.labels(result="refused").inc()
            return [], Reply.of(451, "4.7.5", f"MTA-STS policy of {domain} (enforce, mx {','.join(policy.mx)}) "
                                              f"lists none of its MX hosts ({','.join(refused)})")
        return allowed, None

    async def _session(self, target: Target, source: Source, enforce: bool = False) -> SmtpSession:
        # Connections made under an enforced policy (verified TLS) are cached apart from opportunistic ones.
        session = self._cache.take(target, source.name + ("|sts" if enforce else ""))
        if session is None:
            session = await self._open(target, source, enforce)
        return session

    async def _open(self, target: Target, source: Source, enforce: bool = False) -> SmtpSession:
        self.connections_opened += 1
        try:
            session = await SmtpSession.open(target, self._settings_for(source, enforce), source)
        except HostUnavailable as exc:
            if enforce and exc.reply.enhanced.startswith("4.7."):
                raise HostUnavailable(Reply.of(451, "4.7.5", f"MTA-STS policy requires verified TLS: "
                                                             f"{exc.reply.text}"), exc.remote) from None
            raise
        if enforce:
            session.source = dataclasses.replace(source, name=source.name + "|sts")
        return session

    def _settings_for(self, source: Source, enforce: bool = False) -> SessionSettings:
        if not source.helo_name and not enforce:
            return self._settings
        settings = self._source_settings.get((source.name, enforce))
        if settings is None:
            settings = dataclasses.replace(self._settings, helo_name=source.helo_name or self._settings.helo_name)
            if enforce:
                settings = dataclasses.replace(settings, tls_mode="verify",
                                               ssl_context=self._sts_context or client_ssl_context("verify"))
            self._source_settings[(source.name, enforce)] = settings
        return settings

    async def _deliver_via(self, target: Target, source: Source, job: Deliver, recipients: Sequence[str],
                           decided: dict[str, Outcome], started: float, enforce: bool = False
                           ) -> tuple[list[str], _HostFailure | None]:
        """Send to one host. Returns the recipients it left undecided (for the next host) and why.

        Outcomes decided here carry the host's port and the time since `started` (DNS, earlier hosts, getting
        this session) as connect_seconds, and the time of their transaction as transfer_seconds."""
        chunk_size = self._delivery.max_recipients_per_transaction
        chunks = [list(recipients[i:i + chunk_size]) for i in range(0, len(recipients), chunk_size)]
        try:
            session = await self._session(target, source, enforce)
        except HostUnavailable as exc:
            return list(recipients), _HostFailure(exc.reply, exc.remote, target.port)
        connected = time.perf_counter()
        setup = connected - started

        # The recipients of a transaction mostly get the same reply object: its outcome is made once, and each
        # recipient gets a copy with its own address (100 per bulk job). The reply is kept with its outcome, so
        # its id cannot be reused by another reply meanwhile.
        made: dict[tuple[int, float], tuple[Reply, Outcome]] = {}

        def decide(recipient: str, reply: Reply, transfer: float = 0.0) -> None:
            known = made.get((id(reply), transfer))
            if known is None or known[0] is not reply or known[1].remote != session.remote:
                outcome = outcome_from_reply(recipient, reply, session.remote, target.port, setup, transfer)
                made[(id(reply), transfer)] = (reply, outcome)
                decided[recipient] = outcome
                return
            first = known[1]
            decided[recipient] = Outcome(recipient, first.kind, first.code, first.enhanced, first.text, first.remote,
                                         first.port, first.connect_seconds, first.transfer_seconds)

        for index, chunk in enumerate(chunks):
            undecided = [r for chunk_rest in chunks[index:] for r in chunk_rest]
            limit = session.capabilities.size_limit
            if limit and len(job.body) > limit:
                # RFC 1870 6.1: do not send what the server said it will not take.
                reply = too_big_for_remote(len(job.body), limit, session.remote)
                for recipient in undecided:
                    decide(recipient, reply)
                self._cache.give_back(session)
                return [], None
            if not session.capabilities.smtputf8:
                chunk = self._without_utf8_addresses(job.sender, chunk, decided, session.remote)
                if not chunk:
                    continue
                undecided = [*chunk, *(r for later in chunks[index + 1:] for r in later)]
            sending = time.perf_counter()
            try:
                result = await self._transaction(session, target, source, job, chunk, enforce)
            except HostUnavailable as exc:
                return undecided, _HostFailure(exc.reply, exc.remote, target.port)
            session = result[0]
            replies = result[1].replies
            if result[1].all_recipients_deferred:
                # Every RCPT got 4xx: this host is not taking mail now; the next one may.
                self._cache.give_back(session)
                return undecided, _HostFailure(replies[chunk[-1]], session.remote, target.port)
            transfer = time.perf_counter() - sending
            for recipient in chunk:
                decide(recipient, replies[recipient], transfer)
        self._cache.give_back(session)
        return [], None

    @staticmethod
    def _without_utf8_addresses(sender: str, chunk: list[str], decided: dict[str, Outcome],
                                remote: str) -> list[str]:
        """RFC 6531 3.2: non-ASCII addresses need SMTPUTF8; without it they fail (553 5.6.7, RFC 6531 3.6.1)."""
        needs = chunk if not sender.isascii() else [r for r in chunk if not r.isascii()]
        for recipient in needs:
            reply = smtputf8_unsupported(remote)
            decided[recipient] = outcome_from_reply(recipient, reply, remote)
        return [r for r in chunk if r not in needs]

    async def _transaction(self, session: SmtpSession, target: Target, source: Source, job: Deliver,
                           chunk: list[str], enforce: bool = False) -> tuple[SmtpSession, TransactionResult]:
        session.transaction_limit = job.max_deliveries
        try:
            return session, await session.transaction(job.sender, chunk, job.body)
        except HostUnavailable as exc:
            if not exc.stale:
                raise
        # The cached connection had died while idle: one fresh connection (RFC 5321 4.5.4.1 allows retrying).
        log.debug("cached connection to %s was stale; reconnecting", target.label)
        fresh = await self._open(target, source, enforce)
        try:
            return fresh, await fresh.transaction(job.sender, chunk, job.body)
        except HostUnavailable:
            fresh.close()
            raise
