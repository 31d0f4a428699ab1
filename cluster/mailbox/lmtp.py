"""The mailbox role's LMTP listener (RFC 2033): workers hand over mail for the Maildirs this node owns.

Each connection runs the sans-I/O `cluster.smtp.lmtp.LmtpServerConnection` and answers its decisions:
- MAIL: accepted (the sender is the worker's business; only workers may connect: NetworkPolicy, loopback);
- RCPT: 550 5.1.3 when the local part cannot name a mailbox; 451 4.3.5 when the mailbox belongs to another
  node of `mailbox.nodes` (a configuration mismatch: ARCHITECTURE.md contract 7, one owner per Maildir);
  else accepted;
- end of data: each recipient in turn is stored (`cluster.mailbox.storing`: fsync of file and directory
  before its 250; quota; full disk) and gets its own reply (RFC 2033 4.2);
- STARTTLS (RFC 3207) when `mailbox.tls_cert_file` is set: workers require it for nodes off loopback.
Limits: the SMTP limits of `[smtp]` (line lengths, message size, recipients per transaction, errors) and
`mailbox.lmtp_timeout` per read. One log line per recipient outcome (mailbox, outcome, file).
Failure modes: a connection that drops mid-message stores nothing for that message; a crash after a file
was renamed into new/ but before its 250 went out leaves a copy the worker will deliver again (a duplicate,
only for what was in flight: ARCHITECTURE.md contract 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Callable

from cluster.config import Config
from cluster.mailbox import metrics
from cluster.mailbox.maildir import MailboxNameError, MaildirStore, mailbox_name
from cluster.mailbox.ownership import node_for_mailbox
from cluster.mailbox.storing import store_for_recipient
from cluster.smtp import replies
from cluster.smtp.events import (
    ExtensionCommand,
    ExtensionLine,
    MailRequested,
    MessageReceived,
    NeedData,
    Paused,
    RcptRequested,
    SessionEnded,
)
from cluster.smtp.lmtp import LmtpServerConnection
from cluster.smtp.replies import Reply
from cluster.smtp.server import ServerSettings

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
HEADER_ALLOWANCE = 64 * 1024
READY_FOR_TLS = Reply.of(220, "2.0.0", "Ready to start TLS")
TLS_NOT_AVAILABLE = Reply.of(454, "4.7.0", "TLS not available")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Mailbox node shutting down")


class LmtpListener:
    """Serves LMTP on every `mailbox.lmtp_listen` address for node `node`; `close()` stops it."""

    def __init__(self, config: Config, node: int, store: MaildirStore, tls: ssl.SSLContext | None,
                 quota_of: Callable[[str], int]) -> None:
        self.config = config
        self.node = node
        self.store = store
        self.tls = tls
        self.quota_of = quota_of
        settings = ServerSettings.from_config(config.smtp)
        # The frontend's limit applies to what clients send; the Received header it adds must still fit here.
        # Workers send DATA, never BDAT: CHUNKING stays off whatever the frontends do.
        settings = dataclasses.replace(settings, max_message_size=settings.max_message_size + HEADER_ALLOWANCE,
                                       chunking=False)
        self.settings = dataclasses.replace(settings, extra_extensions=("STARTTLS",) if tls else (),
                                            extension_commands=frozenset({"STARTTLS"}))
        self.tls_settings = dataclasses.replace(settings, extension_commands=frozenset({"STARTTLS"}))
        self.sessions: set[asyncio.Task[None]] = set()
        # Sessions storing a message now: shutdown lets them finish so their replies go out.
        self.storing: set[asyncio.Task[None]] = set()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        metrics.LMTP_CONNECTIONS_CURRENT.inc()
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "unknown"
        try:
            await self._session(reader, writer, client)
        except (ConnectionError, OSError) as exc:
            log.debug("lmtp session with %s ended: %s", client, exc)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(SHUTTING_DOWN.to_bytes())
        finally:
            self.sessions.discard(task)
            metrics.LMTP_CONNECTIONS_CURRENT.dec()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str) -> None:
        conn = LmtpServerConnection(self.settings)
        conn.start()
        tls_active = False
        timeout = float(self.config.mailbox.lmtp_timeout)
        while not conn.closed:
            event = conn.next_event()
            if event is NeedData:
                await _flush(writer, conn)
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
                except TimeoutError:
                    conn.timed_out()
                    continue
                conn.receive_data(data)
            elif event is Paused:
                raise RuntimeError("LMTP session paused with no pending decision")
            elif isinstance(event, MailRequested):
                conn.respond(replies.SENDER_OK)
            elif isinstance(event, RcptRequested):
                conn.respond(self._check_recipient(event.recipient.local_part))
            elif isinstance(event, MessageReceived):
                conn.respond_recipients(await self._store(event))
            elif isinstance(event, ExtensionCommand) and event.verb == "STARTTLS":
                if self.tls is None or tls_active:
                    conn.respond(TLS_NOT_AVAILABLE)
                    continue
                conn.respond(READY_FOR_TLS)
                writer.write(conn.data_to_send())
                await writer.drain()
                try:
                    await writer.start_tls(self.tls, ssl_handshake_timeout=timeout)
                except OSError as exc:
                    log.info("lmtp STARTTLS with %s failed: %s", client, exc)
                    return
                tls_active = True
                conn.starttls_completed()
                conn.settings = self.tls_settings
            elif isinstance(event, ExtensionCommand | ExtensionLine):
                conn.respond(replies.UNKNOWN_COMMAND)
            elif isinstance(event, SessionEnded):
                break
        await _flush(writer, conn)

    def _check_recipient(self, localpart: str) -> Reply:
        try:
            mailbox = mailbox_name(localpart)
        except MailboxNameError:
            metrics.LMTP_DELIVERIES.labels(outcome="refused").inc()
            return replies.BAD_MAILBOX_NAME
        owner = node_for_mailbox(mailbox, self.config.mailbox.nodes)
        if owner != self.node:
            metrics.LMTP_DELIVERIES.labels(outcome="refused").inc()
            log.warning("lmtp recipient mailbox=%s belongs to node %d, not to this node %d", mailbox, owner,
                        self.node)
            return replies.NOT_MAILBOX_OWNER
        return replies.RECIPIENT_OK

    async def _store(self, event: MessageReceived) -> list[Reply]:
        task = asyncio.current_task()
        assert task is not None
        self.storing.add(task)
        try:
            sender = str(event.sender) if event.sender is not None else ""
            answers = []
            for recipient in event.recipients:
                # Shielded: a shutdown waits for the file in hand to be fsynced and answered, not half-written.
                reply, outcome, name = await asyncio.shield(asyncio.to_thread(
                    store_for_recipient, self.store, self.quota_of, recipient.local_part, sender, event.data))
                metrics.LMTP_DELIVERIES.labels(outcome=outcome).inc()
                log.info("lmtp delivery to=<%s> from=<%s> size=%d outcome=%s reply=%s%s", recipient, sender,
                         len(event.data), outcome, reply.code, f" file={name}" if name else "")
                answers.append(reply)
            return answers
        finally:
            self.storing.discard(task)


async def _flush(writer: asyncio.StreamWriter, conn: LmtpServerConnection) -> None:
    data = conn.data_to_send()
    if data:
        writer.write(data)
        await writer.drain()
