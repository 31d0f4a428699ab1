"""One SMTP session: feeds a socket's bytes to the sans-I/O server and answers its decision events.

Input: an asyncio stream pair. The protocol (framing, syntax, order, limits) is decided entirely by
`cluster.smtp.server.ServerConnection`; this module only decides what the protocol leaves open:
- MAIL: accepted (the shards refuse new mail with 452 4.3.1 when their disk is full);
- RCPT: the relay policy (`cluster.frontend.policy`);
- end of DATA: prepend the Received header and store the message on every shard that owns a recipient;
  250 only after all of them answered Stored (`cluster.frontend.injector`).
Timeouts: the command or data timeout from the configuration, whichever the protocol state calls for.
Failure modes: a client that vanishes, sends garbage or times out ends its own session and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time

from cluster.config import SmtpConfig
from cluster.frontend import metrics
from cluster.frontend.injector import ShardClient
from cluster.frontend.policy import RelayPolicy
from cluster.frontend.received import received_header
from cluster.smtp.events import MailRequested, MessageReceived, RcptRequested, SessionEnded
from cluster.smtp.reply import Reply
from cluster.smtp.server import NeedData, Paused, ServerConnection, ServerSettings

log = logging.getLogger(__name__)

SENDER_OK = Reply.of(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply.of(250, "2.1.5", "Recipient ok")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Service shutting down, try again later")
READ_SIZE = 256 * 1024


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


class SmtpSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, config: SmtpConfig,
                 settings: ServerSettings, policy: RelayPolicy, shards: ShardClient, client_ip: str,
                 initial_data: bytes = b"") -> None:
        self.reader = reader
        self.writer = writer
        self.config = config
        self.policy = policy
        self.shards = shards
        self.client_ip = client_ip
        self.may_relay = policy.client_may_relay(client_ip)
        self.conn = ServerConnection(settings, observer=_MetricsObserver())
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
                refusal = self.policy.check_recipient(self.may_relay, event.recipient.ascii_domain)
                if refusal is not None:
                    metrics.MESSAGES_REJECTED.labels(reason="relay_denied").inc()
                self.conn.respond(refusal or RECIPIENT_OK)
            elif isinstance(event, MessageReceived):
                self.storing = True
                try:
                    self.conn.respond(await self._store(event))
                finally:
                    self.storing = False
            elif isinstance(event, SessionEnded):
                break
        self._flush()
        await self.writer.drain()

    async def _store(self, message: MessageReceived) -> Reply:
        ended = time.perf_counter()
        trace_id = new_trace_id()
        recipients = [str(r) for r in message.recipients]
        protocol = "UTF8SMTP" if message.smtputf8 else "ESMTP" if self.conn.esmtp else "SMTP"
        header = received_header(helo=self.conn.helo_name, client_ip=self.client_ip,
                                 hostname=self.config.hostname, protocol=protocol, trace_id=trace_id,
                                 recipients=recipients, timestamp=time.time())
        body = header + message.data
        sender = "" if message.sender is None else str(message.sender)
        client = {"ip": self.client_ip, "helo": self.conn.helo_name or "", "protocol": protocol,
                  "trace_id": trace_id}
        reply, queue_ids = await self.shards.inject(sender, recipients, body, client)
        if reply.is_positive:
            metrics.MESSAGES_ACCEPTED.inc()
            metrics.RECEIVED_BYTES.inc(len(message.data))
            metrics.ACCEPT_LATENCY.observe(time.perf_counter() - ended)
            log.info("accepted trace=%s from=<%s> nrcpt=%d size=%d queue_ids=%s client=%s", trace_id, sender,
                     len(recipients), len(message.data), ",".join(queue_ids), self.client_ip)
        else:
            reason = "disk_full" if reply.enhanced == "4.3.1" else "queue_unavailable"
            metrics.MESSAGES_REJECTED.labels(reason=reason).inc()
            log.warning("not stored trace=%s from=<%s> reply=%s", trace_id, sender, reply)
        return reply
