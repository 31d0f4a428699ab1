"""One inbound SMTP session: feeds a socket's bytes to the sans-I/O server and answers its decision events.

Input: an asyncio stream pair and the `Listener` it arrived on. The protocol (framing, syntax, order, limits)
is decided entirely by `cluster.smtp.server.ServerConnection`; this module only decides what the protocol
leaves open, asking the listener's `SessionPolicy` (`cluster.frontend.policy`) at each decision point:
- AUTH (RFC 4954): `policy.check_auth` before the exchange, the SASL steps of `cluster.frontend.auth`, the
  password checked against the users file in a thread (scrypt takes ~50 ms and must not stall the other
  sessions), then `policy.check_login`. No password, AUTH line or response line is ever logged;
- MAIL: `policy.check_mail` (the submission listeners refuse it before AUTH with 530 5.7.0; the shards refuse
  new mail with 452 4.3.1 when their disk is full);
- RCPT: `policy.check_rcpt` (the relay policy: no open relay);
- end of DATA: `policy.check_message`; on the submission listeners add Message-ID and Date when missing
  (`cluster.frontend.submission`, RFC 6409 8); DKIM-sign relayed mail (`cluster.frontend.outbound`); prepend
  the Received header and store the message on every shard that owns a recipient; 250 only after all of
  them answered Stored (`cluster.frontend.injector`);
- STARTTLS (RFC 3207): 220, then the TLS handshake on the same stream (`cluster.tls.start_tls`), then the
  protocol starts over (`ServerConnection.starttls_completed`) with the after-TLS settings (no STARTTLS, AUTH
  offered). On an implicit-TLS listener (RFC 8314) the session starts under TLS with those settings.
Timeouts: the command or data timeout from the configuration, whichever the protocol state calls for (the
TLS handshake gets the command timeout).
Failure modes: a client that vanishes, sends garbage, times out, fails its TLS handshake or fails AUTH
`smtp.max_auth_failures` times ends its own session and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import time
from dataclasses import dataclass

from cluster.config import SmtpConfig
from cluster.frontend import metrics
from cluster.frontend.auth import SmtpAuth, Step, Verify
from cluster.frontend.deadline import ReadDeadline
from cluster.frontend.injector import ShardClient
from cluster.frontend.outbound import Outbound
from cluster.frontend.policy import SessionFacts, SessionPolicy, rejection_reason
from cluster.frontend.received import protocol_name, received_header
from cluster.frontend.submission import complete_headers
from cluster.smtp import replies
from cluster.smtp.events import (
    ExtensionCommand,
    ExtensionLine,
    MailRequested,
    MessageReceived,
    RcptRequested,
    SessionEnded,
)
from cluster.smtp.replies import Reply
from cluster.smtp.server import NeedData, Paused, ServerConnection, ServerSettings
from cluster.tls import start_tls
from cluster.users import UserDatabase, UsersFileError

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
# Replies still unsent (bytes) above which the session waits for the client to read before it reads more. Below
# it, drain() would return at once: skipping it saves a coroutine per read (a vanished client shows as EOF or
# a connection error on the read that follows).
DRAIN_ABOVE = 64 * 1024


@dataclass(frozen=True)
class Security:
    """What a session needs for STARTTLS and AUTH; built once per frontend process."""

    # None: TLS is not configured, STARTTLS is not offered (and AUTH always gets 538).
    tls_context: ssl.SSLContext | None = None
    # The protocol settings once TLS is up (STARTTLS no longer offered, AUTH offered when there are users).
    tls_settings: ServerSettings | None = None
    # None: no users file, nobody can log in.
    users: UserDatabase | None = None
    # DKIM signing and the egress pool of accepted mail (cluster.frontend.outbound); None: neither.
    outbound: Outbound | None = None


@dataclass(frozen=True)
class Listener:
    """One kind of listening address, and how sessions on it behave (built once per frontend process)."""

    # policy.SMTP ("smtp.listen"), policy.SUBMISSION or policy.SUBMISSIONS: the `listener` metric label.
    kind: str
    # The protocol settings a session starts with (for implicit TLS: the after-TLS settings).
    settings: ServerSettings
    # What the session asks at AUTH, MAIL, RCPT and end of DATA.
    policy: SessionPolicy
    # RFC 8314 3.3: the connection is TLS from the first byte (the frontend did the handshake).
    implicit_tls: bool = False
    # RFC 6409 8.2, 8.3: add Message-ID and Date when the message has none (submission only, never port 25).
    complete_headers: bool = False


class _MetricsObserver:
    """Counts every command verb and every reply class (metrics.COMMANDS, metrics.REPLIES).

    Counted here first and added to the Prometheus counters by `flush()`, which the session calls at each end of
    DATA and when it ends: a locked counter increment per command and per reply cost more than the rest of
    handling a RCPT. Rejections are counted at once."""

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self._commands: dict[str, int] = {}
        self._replies: dict[int, int] = {}  # by reply code

    def command(self, verb: str) -> None:
        self._commands[verb] = self._commands.get(verb, 0) + 1

    def flush(self) -> None:
        for verb, count in self._commands.items():
            metrics.command_counter(verb).inc(count)
        for code, count in self._replies.items():
            metrics.reply_counter(code).inc(count)
        self._commands.clear()
        self._replies.clear()

    def reply(self, reply: Reply) -> None:
        self._replies[reply.code] = self._replies.get(reply.code, 0) + 1
        if reply.code >= 400:
            reason = _PROTOCOL_REJECTIONS.get(reply.enhanced)
            if reason is not None:
                metrics.rejections(reason, self.listener).inc()


# Refusals the protocol machine makes on its own, by enhanced status code. Policy refusals, timeouts and queue
# failures are counted where this module decides them.
_PROTOCOL_REJECTIONS = {
    "5.3.4": "too_big",
    "4.5.3": "too_many_recipients",
    "5.6.0": "protocol",
    "5.5.2": "syntax",
    "5.5.4": "syntax",
    "5.1.3": "syntax",
    "5.1.7": "syntax",
    "5.5.1": "protocol",
}


# Trace ids are made 128 at a time: one os.urandom and one base32 encoding for all of them (10 random bytes
# are exactly 16 base32 characters, so slicing the encoding of many gives the same ids as encoding each).
_TRACE_ID_BATCH = 128
_trace_ids: list[str] = []


def new_trace_id() -> str:
    """A short random id (16 base32 characters, 80 random bits) naming this message in the Received header and
    the logs."""
    if not _trace_ids:
        text = base64.b32encode(os.urandom(10 * _TRACE_ID_BATCH)).decode("ascii").lower()
        _trace_ids.extend(text[i:i + 16] for i in range(0, len(text), 16))
    return _trace_ids.pop()


class InboundSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, config: SmtpConfig,
                 listener: Listener, shards: ShardClient, client_ip: str, trusted_network: bool,
                 initial_data: bytes = b"", security: Security | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.config = config
        self.listener = listener
        self.policy = listener.policy
        self.shards = shards
        self.client_ip = client_ip
        self.observer = _MetricsObserver(listener.kind)
        self.security = security or Security()
        settings = listener.settings
        self.conn = ServerConnection(settings, observer=self.observer)
        self.auth = SmtpAuth(config.max_auth_failures)
        self.facts = SessionFacts(client_ip=client_ip, listener=listener.kind, tls=listener.implicit_tls,
                                  trusted_network=trusted_network)
        # Bytes the client sent right after a PROXY protocol header, before we read anything else.
        self.initial_data = initial_data
        # True while a message is being stored: a graceful shutdown waits for these sessions to answer.
        self.storing = False

    @property
    def tls(self) -> bool:
        return self.facts.tls

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def _timeout(self) -> float:
        kind = self.conn.current_timeout_kind
        return float(self.config.data_timeout if kind == "data" else self.config.command_timeout)

    def _count_refusal(self, reply: Reply | None) -> None:
        if reply is not None:
            metrics.rejections(rejection_reason(reply), self.listener.kind).inc()

    def _sync_facts(self) -> None:
        """Copy what the protocol machine learnt (HELO name, end of a transaction) into the policy's facts."""
        self.facts.helo = self.conn.helo_name
        if not self.conn.in_transaction:
            self.facts.sender = None
            self.facts.recipients = []
            self.facts.trace_headers = []
            self.facts.reservation = ""

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        deadline = ReadDeadline(task)
        try:
            await self._run(deadline)
        finally:
            deadline.close()
            self.observer.flush()

    async def _run(self, deadline: ReadDeadline) -> None:
        self.conn.start()
        if self.initial_data:
            self.conn.receive_data(self.initial_data)
        self._flush()
        while not self.conn.closed:
            event = self.conn.next_event()
            if event is NeedData:
                self._flush()
                if self.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                    await self.writer.drain()  # the client is not reading its replies: wait for it
                deadline.arm(self._timeout())
                try:
                    data = await self.reader.read(READ_SIZE)
                except asyncio.CancelledError:
                    if not deadline.expired():
                        self.writer.write(replies.SHUTTING_DOWN.to_bytes())
                        raise
                    metrics.rejections("timeout", self.listener.kind).inc()
                    self.conn.timed_out()
                    continue
                finally:
                    deadline.disarm()
                self.conn.receive_data(data)
                continue
            if event is Paused:  # cannot happen: every decision is answered at once below
                raise RuntimeError("SMTP session paused with no pending decision")
            self._sync_facts()
            if isinstance(event, MailRequested):
                refusal = await self.policy.check_mail(self.facts, event.sender, event.params)
                self._count_refusal(refusal)
                if refusal is None:
                    self.facts.sender = event.sender
                self.conn.respond(refusal or replies.SENDER_OK)
            elif isinstance(event, RcptRequested):
                refusal = await self.policy.check_rcpt(self.facts, event.recipient)
                self._count_refusal(refusal)
                if refusal is None:
                    self.facts.recipients.append(event.recipient)
                self.conn.respond(refusal or replies.RECIPIENT_OK)
            elif isinstance(event, MessageReceived):
                self.observer.flush()
                self.storing = True
                try:
                    refusal = await self.policy.check_message(self.facts, event)
                    self._count_refusal(refusal)
                    reply = refusal
                    if reply is None:
                        reply = await self._store(event)
                        await self.policy.message_stored(self.facts, reply.is_positive)
                    self.conn.respond(reply)
                finally:
                    self.storing = False
            elif isinstance(event, ExtensionCommand) and event.verb == "STARTTLS":
                if not await self._starttls(event.argument):
                    return
            elif isinstance(event, ExtensionCommand):
                if not await self._auth_command(event.argument):
                    break
            elif isinstance(event, ExtensionLine):
                if not await self._auth_step(self.auth.line(event.line)):
                    break
            elif isinstance(event, SessionEnded):
                break
        self._flush()
        await self.writer.drain()

    async def _starttls(self, argument: str) -> bool:
        """RFC 3207 4: answer 220, handshake, start over. False when the session must end (failed handshake)."""
        context = self.security.tls_context
        if self.tls or context is None:
            self.conn.respond(replies.TLS_ALREADY_ACTIVE)
            return True
        if argument.strip(" "):
            self.conn.respond(replies.STARTTLS_SYNTAX)
            return True
        self.conn.respond(replies.READY_FOR_TLS)
        try:
            discarded = await start_tls(self.reader, self.writer, context, self.conn.data_to_send(),
                                        float(self.config.command_timeout))
        except OSError as exc:  # ssl.SSLError, ConnectionError and handshake timeouts are all OSErrors
            metrics.TLS_HANDSHAKES.labels(result="failure").inc()
            log.info("TLS handshake with %s failed: %s", self.client_ip, exc)
            return False
        if discarded:
            log.info("discarded %d plaintext bytes that %s sent after STARTTLS", discarded, self.client_ip)
        metrics.TLS_HANDSHAKES.labels(result="success").inc()
        self.facts.tls = True
        self.conn.starttls_completed()
        if self.security.tls_settings is not None:
            self.conn.settings = self.security.tls_settings
        return True

    async def _auth_command(self, argument: str) -> bool:
        """The AUTH command: the policy may refuse it before any exchange (e.g. a client guessing passwords)."""
        step = self.auth.command(argument, tls=self.tls, greeted=self.conn.helo_name is not None,
                                 in_transaction=self.conn.in_transaction)
        if isinstance(step, Verify) or step.code == 334:
            refusal = await self.policy.check_auth(self.facts)
            if refusal is not None:
                self.auth.cancel()
                log.info("AUTH refused by policy client=%s reply=%s", self.client_ip, refusal)
                step = refusal
        return await self._auth_step(step)

    async def _auth_step(self, step: Step) -> bool:
        """Answer one step of an AUTH exchange. False when the session must end (too many failures)."""
        if isinstance(step, Verify):
            reply = await self._verify(step)
        else:
            reply = step
        if reply.code != 334:
            metrics.AUTH.labels(result="success" if reply == replies.AUTH_SUCCEEDED else "failure").inc()
            if reply == replies.AUTH_SUCCEEDED:
                self.facts.user = self.auth.user
                log.info("authenticated user=%s client=%s listener=%s", self.auth.user, self.client_ip,
                         self.listener.kind)
            else:
                log.info("authentication failed client=%s reply=%s", self.client_ip, reply)
        self.conn.respond(reply)
        if reply.code == 421 and not self.conn.closed:
            return False  # the policy closes the session (RFC 5321 3.8)
        if self.auth.exhausted and not self.conn.closed:
            self._flush()
            self.writer.write(replies.AUTH_TOO_MANY_FAILURES.to_bytes())
            self.observer.reply(replies.AUTH_TOO_MANY_FAILURES)
            log.info("closing the session with %s after %d failed AUTH attempts", self.client_ip, self.auth.failures)
            return False
        return True

    async def _verify(self, step: Verify) -> Reply:
        """Check the password (in a thread), then let the policy have its say on the login."""
        users = self.security.users
        try:
            verified = users is not None and await asyncio.to_thread(users.verify, step.username, step.password)
        except UsersFileError as exc:
            log.warning("cannot check SMTP AUTH credentials: %s", exc)
            return self.auth.temporary_failure()
        refusal = await self.policy.check_login(self.facts, step.username, verified)
        if refusal is not None:
            return self.auth.refused(refusal)
        return self.auth.verified(verified)

    async def _store(self, message: MessageReceived) -> Reply:
        ended = time.perf_counter()
        trace_id = new_trace_id()
        recipients = [str(r) for r in message.recipients]
        protocol = protocol_name(esmtp=self.conn.esmtp, smtputf8=message.smtputf8, tls=self.tls,
                                 authenticated=self.auth.user is not None)
        now = time.time()
        header = received_header(helo=self.conn.helo_name, client_ip=self.client_ip,
                                 hostname=self.config.hostname, protocol=protocol, trace_id=trace_id,
                                 recipients=recipients, timestamp=now)
        data = message.data
        if self.listener.complete_headers:
            data = complete_headers(data, hostname=self.config.hostname, trace_id=trace_id, timestamp=now)
        sender = "" if message.sender is None else str(message.sender)
        # DKIM signs what is stored, so the submission header fields are added first.
        outbound = self.security.outbound
        prepared = (await outbound.prepare(data, sender=sender, user=self.auth.user, relayed=self.facts.may_relay)
                    if outbound is not None else None)
        # RFC 7208 9.1: Received-SPF (from the checks) above our Received field.
        header = b"".join(self.facts.trace_headers) + header
        body = (prepared.header if prepared is not None else b"") + header + data
        client = {"ip": self.client_ip, "helo": self.conn.helo_name or "", "protocol": protocol,
                  "trace_id": trace_id}
        if prepared is not None and prepared.pool:
            client["pool"] = prepared.pool
        reply, queue_ids = await self.shards.inject(sender, recipients, body, client)
        if reply.is_positive:
            accepted, received = metrics.accepted(self.listener.kind)
            accepted.inc()
            received.inc(len(message.data))
            metrics.ACCEPT_LATENCY.observe(time.perf_counter() - ended)
            log.info("accepted trace=%s from=<%s> nrcpt=%d size=%d queue_ids=%s client=%s listener=%s%s%s", trace_id,
                     sender, len(recipients), len(message.data), ",".join(queue_ids), self.client_ip,
                     self.listener.kind, f" user={self.auth.user}" if self.auth.user is not None else "",
                     f" dkim={prepared.dkim}" if prepared is not None and prepared.dkim else "")
        else:
            reason = "disk_full" if reply.enhanced == "4.3.1" else "queue_unavailable"
            metrics.rejections(reason, self.listener.kind).inc()
            log.warning("not stored trace=%s from=<%s> reply=%s", trace_id, sender, reply)
        return reply

