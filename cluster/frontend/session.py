"""One SMTP session: feeds a socket's bytes to the sans-I/O server and answers its decision events.

Input: an asyncio stream pair. The protocol (framing, syntax, order, limits) is decided entirely by
`cluster.smtp.server.ServerConnection`; this module only decides what the protocol leaves open:
- MAIL: accepted (the shards refuse new mail with 452 4.3.1 when their disk is full);
- RCPT: the relay policy (`cluster.frontend.policy`); an authenticated client may relay anywhere;
- end of DATA: prepend the Received header and store the message on every shard that owns a recipient;
  250 only after all of them answered Stored (`cluster.frontend.injector`);
- STARTTLS (RFC 3207): 220, then the TLS handshake on the same stream, then the protocol starts over
  (`ServerConnection.starttls_completed`) with the after-TLS settings (no STARTTLS, AUTH offered);
- AUTH (RFC 4954): the SASL exchange of `cluster.frontend.auth`; passwords are checked against the users file
  in a thread (scrypt takes ~50 ms and must not stall the other sessions). No password, AUTH line or
  response line is ever logged.
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
from cluster.frontend.auth import SUCCEEDED, TOO_MANY_FAILURES, SmtpAuth, Step, Verify
from cluster.frontend.injector import ShardClient
from cluster.frontend.outbound import Outbound
from cluster.frontend.policy import RelayPolicy
from cluster.frontend.received import protocol_name, received_header
from cluster.smtp.events import (
    ExtensionCommand,
    ExtensionLine,
    MailRequested,
    MessageReceived,
    RcptRequested,
    SessionEnded,
)
from cluster.smtp.reply import Reply
from cluster.smtp.server import NeedData, Paused, ServerConnection, ServerSettings
from cluster.users import UserDatabase, UsersFileError

log = logging.getLogger(__name__)

SENDER_OK = Reply.of(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply.of(250, "2.1.5", "Recipient ok")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Service shutting down, try again later")
READY_FOR_TLS = Reply.of(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY_ACTIVE = Reply.of(503, "5.5.1", "TLS already active")
STARTTLS_SYNTAX = Reply.of(501, "5.5.4", "Syntax: STARTTLS (no parameters)")
READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class Security:
    """What a session needs for STARTTLS and AUTH; built once per frontend process."""

    # None: TLS is not configured, STARTTLS is not offered (and AUTH always gets 538).
    tls_context: ssl.SSLContext | None = None
    # The protocol settings once TLS is up (STARTTLS no longer offered, AUTH offered when there are users).
    tls_settings: ServerSettings | None = None
    # None: no users file, nobody can log in.
    users: UserDatabase | None = None
    # DKIM signing of relayed mail (cluster.frontend.outbound); None: nothing is added.
    outbound: Outbound | None = None


class _MetricsObserver:
    """Counts every command verb and every reply class (metrics.COMMANDS, metrics.REPLIES)."""

    def command(self, verb: str) -> None:
        metrics.COMMANDS.labels(command=verb if verb in metrics.COMMAND_NAMES else "other").inc()

    def reply(self, reply: Reply) -> None:
        metrics.REPLIES.labels(**{"class": f"{reply.code // 100}xx"}).inc()
        reason = _REJECTION_REASONS.get(reply.enhanced) if reply.code >= 400 else None
        if reason is not None:
            metrics.MESSAGES_REJECTED.labels(reason=reason).inc()


# Refusals the protocol machine makes on its own, by enhanced status code. Relay denials, timeouts and queue
# failures are counted where this module decides them.
_REJECTION_REASONS = {
    "5.3.4": "too_big",
    "4.5.3": "too_many_recipients",
    "5.6.0": "protocol",
    "5.5.2": "syntax",
    "5.5.4": "syntax",
    "5.1.3": "syntax",
    "5.1.7": "syntax",
    "5.5.1": "protocol",
}


def new_trace_id() -> str:
    """A short random id naming this message in the Received header and the logs."""
    return base64.b32encode(os.urandom(10)).decode("ascii").lower()


def discard_buffered_input(reader: asyncio.StreamReader) -> int:
    """Drop what `reader` holds unread and return its length.

    CVE-2011-0411: bytes that arrived after STARTTLS, before the handshake, are plaintext injection. The protocol
    machine dropped what it had buffered; the stream may hold more that arrived since the last read. The caller
    runs this just before `start_tls` takes over the transport, with no await in between, so nothing slips in.
    asyncio offers no public way to drop buffered input; `_buffer` is the StreamReader's bytearray (CPython
    3.11, tested in tests/unit/test_frontend_auth.py).
    """
    buffered = getattr(reader, "_buffer", None)
    if not isinstance(buffered, bytearray):
        return 0
    length = len(buffered)
    buffered.clear()
    return length


class SmtpSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, config: SmtpConfig,
                 settings: ServerSettings, policy: RelayPolicy, shards: ShardClient, client_ip: str,
                 initial_data: bytes = b"", security: Security | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.config = config
        self.policy = policy
        self.shards = shards
        self.client_ip = client_ip
        self.may_relay = policy.client_may_relay(client_ip)
        self.observer = _MetricsObserver()
        self.conn = ServerConnection(settings, observer=self.observer)
        self.security = security or Security()
        self.tls = False
        self.auth = SmtpAuth(config.max_auth_failures)
        # Bytes the client sent right after a PROXY protocol header, before we read anything else.
        self.initial_data = initial_data
        # True while a message is being stored: a graceful shutdown waits for these sessions to answer.
        self.storing = False

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def _timeout(self) -> float:
        kind = self.conn.current_timeout_kind
        return float(self.config.data_timeout if kind == "data" else self.config.command_timeout)

    async def run(self) -> None:
        self.conn.start()
        if self.initial_data:
            self.conn.receive_data(self.initial_data)
        self._flush()
        while not self.conn.closed:
            event = self.conn.next_event()
            if event is NeedData:
                self._flush()
                await self.writer.drain()
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_SIZE), self._timeout())
                except asyncio.CancelledError:
                    self.writer.write(SHUTTING_DOWN.to_bytes())
                    raise
                except TimeoutError:
                    metrics.MESSAGES_REJECTED.labels(reason="timeout").inc()
                    self.conn.timed_out()
                    continue
                self.conn.receive_data(data)
            elif event is Paused:  # cannot happen: every decision is answered at once below
                raise RuntimeError("SMTP session paused with no pending decision")
            elif isinstance(event, MailRequested):
                self.conn.respond(SENDER_OK)
            elif isinstance(event, RcptRequested):
                may_relay = self.may_relay or self.auth.user is not None
                refusal = self.policy.check_recipient(may_relay, event.recipient.ascii_domain)
                if refusal is not None:
                    metrics.MESSAGES_REJECTED.labels(reason="relay_denied").inc()
                self.conn.respond(refusal or RECIPIENT_OK)
            elif isinstance(event, MessageReceived):
                self.storing = True
                try:
                    self.conn.respond(await self._store(event))
                finally:
                    self.storing = False
            elif isinstance(event, ExtensionCommand) and event.verb == "STARTTLS":
                if not await self._starttls(event.argument):
                    return
            elif isinstance(event, ExtensionCommand):
                step = self.auth.command(event.argument, tls=self.tls, greeted=self.conn.helo_name is not None,
                                         in_transaction=self.conn.in_transaction)
                if not await self._auth_step(step):
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
            self.conn.respond(TLS_ALREADY_ACTIVE)
            return True
        if argument.strip(" "):
            self.conn.respond(STARTTLS_SYNTAX)
            return True
        self.conn.respond(READY_FOR_TLS)
        self._flush()
        await self.writer.drain()
        discarded = discard_buffered_input(self.reader)
        if discarded:
            log.info("discarded %d plaintext bytes that %s sent after STARTTLS", discarded, self.client_ip)
        try:
            await self.writer.start_tls(context, ssl_handshake_timeout=float(self.config.command_timeout))
        except OSError as exc:  # ssl.SSLError, ConnectionError and handshake timeouts are all OSErrors
            metrics.TLS_HANDSHAKES.labels(result="failure").inc()
            log.info("TLS handshake with %s failed: %s", self.client_ip, exc)
            return False
        metrics.TLS_HANDSHAKES.labels(result="success").inc()
        self.tls = True
        self.conn.starttls_completed()
        if self.security.tls_settings is not None:
            self.conn.settings = self.security.tls_settings
        return True

    async def _auth_step(self, step: Step) -> bool:
        """Answer one step of an AUTH exchange. False when the session must end (too many failures)."""
        if isinstance(step, Verify):
            users = self.security.users
            try:
                ok = users is not None and await asyncio.to_thread(users.verify, step.username, step.password)
            except UsersFileError as exc:
                log.warning("cannot check SMTP AUTH credentials: %s", exc)
                reply = self.auth.temporary_failure()
            else:
                reply = self.auth.verified(ok)
        else:
            reply = step
        if reply.code != 334:
            metrics.AUTH.labels(result="success" if reply == SUCCEEDED else "failure").inc()
            if reply == SUCCEEDED:
                log.info("authenticated user=%s client=%s", self.auth.user, self.client_ip)
            else:
                log.info("authentication failed client=%s reply=%s", self.client_ip, reply)
        self.conn.respond(reply)
        if self.auth.exhausted and not self.conn.closed:
            self._flush()
            self.writer.write(TOO_MANY_FAILURES.to_bytes())
            self.observer.reply(TOO_MANY_FAILURES)
            log.info("closing the session with %s after %d failed AUTH attempts", self.client_ip, self.auth.failures)
            return False
        return True

    async def _store(self, message: MessageReceived) -> Reply:
        ended = time.perf_counter()
        trace_id = new_trace_id()
        recipients = [str(r) for r in message.recipients]
        protocol = protocol_name(esmtp=self.conn.esmtp, smtputf8=message.smtputf8, tls=self.tls,
                                 authenticated=self.auth.user is not None)
        header = received_header(helo=self.conn.helo_name, client_ip=self.client_ip,
                                 hostname=self.config.hostname, protocol=protocol, trace_id=trace_id,
                                 recipients=recipients, timestamp=time.time())
        relayed = self.may_relay or self.auth.user is not None
        outbound = self.security.outbound
        prepared = await outbound.prepare(message.data, relayed=relayed) if outbound is not None else None
        body = (prepared.header if prepared is not None else b"") + header + message.data
        sender = "" if message.sender is None else str(message.sender)
        client = {"ip": self.client_ip, "helo": self.conn.helo_name or "", "protocol": protocol,
                  "trace_id": trace_id}
        reply, queue_ids = await self.shards.inject(sender, recipients, body, client)
        if reply.is_positive:
            metrics.MESSAGES_ACCEPTED.inc()
            metrics.RECEIVED_BYTES.inc(len(message.data))
            metrics.ACCEPT_LATENCY.observe(time.perf_counter() - ended)
            log.info("accepted trace=%s from=<%s> nrcpt=%d size=%d queue_ids=%s client=%s%s%s", trace_id, sender,
                     len(recipients), len(message.data), ",".join(queue_ids), self.client_ip,
                     f" user={self.auth.user}" if self.auth.user is not None else "",
                     f" dkim={prepared.dkim}" if prepared is not None and prepared.dkim else "")
        else:
            reason = "disk_full" if reply.enhanced == "4.3.1" else "queue_unavailable"
            metrics.MESSAGES_REJECTED.labels(reason=reason).inc()
            log.warning("not stored trace=%s from=<%s> reply=%s", trace_id, sender, reply)
        return reply
