"""One outbound SMTP connection: an asyncio Protocol feeding the sans-I/O `cluster.smtp.client`.

`SmtpSession.open(target, settings)` connects, reads the greeting, says EHLO (HELO when EHLO gets 5xx, RFC 5321
3.2), upgrades with STARTTLS when offered (RFC 3207; opportunistic without a certificate check unless
`delivery.tls = "verify"`) and returns a session ready for transactions. `session.transaction(sender,
recipients, body)` runs MAIL, RCPT..., DATA (pipelined under RFC 2920 when offered) and returns the reply that
decided each recipient. The session can then take another transaction (connection reuse).

Failure modes: anything that makes the host unusable for this attempt raises `HostUnavailable` carrying the
reply to report (the server's own, or one we make up for network trouble) and the host's label; the session
is then closed. That is: refused or timed-out connections, TLS failures, 421 at any point, 4xx/5xx to the
greeting, 4xx to EHLO/HELO or MAIL, connection loss, and replies that break the protocol. A 5xx to MAIL, or
any reply to RCPT or to the end of data, is returned, not raised: it belongs to the recipients.
Every wait has the RFC 5321 4.5.3.2 timeout given in `delivery.*_timeout`.

With `SessionSettings.lmtp` the same session speaks LMTP (RFC 2033) to a mailbox node: LHLO instead of EHLO,
and after the data one reply per accepted recipient; a server that dies while answering leaves the recipients
it already answered decided (see `_read_lmtp_replies`), so a crash duplicates only what was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import ssl
import time
from dataclasses import dataclass, field

from cluster.config import DeliveryConfig
from cluster.delivery import metrics
from cluster.delivery.egress import DEFAULT_SOURCE, Source
from cluster.delivery.mx import Target
from cluster.smtp import replies
from cluster.smtp.client import (
    Capabilities,
    ClientConnection,
    Command,
    SmtpProtocolError,
    has_8bit,
)
from cluster.smtp.replies import Reply

# Body bytes written before waiting for the socket to drain (each wait bounded by data_block_timeout).
WRITE_BLOCK = 256 * 1024
# A message of at least this many octets is written as the body itself, then the end-of-data line (a copy of
# a big body costs more than the second write; a small one goes in one write).
BIG_MESSAGE = 64 * 1024
# Seconds by which a read timer may run before its deadline and still count as reached (uvloop rounds timers to
# milliseconds).
TIMER_SLACK = 0.002


class HostUnavailable(Exception):
    """This host cannot take the mail now; try the next one. `reply` is what to report if none can."""

    def __init__(self, reply: Reply, remote: str, stale: bool = False) -> None:
        super().__init__(f"{remote}: {reply}")
        self.reply = reply
        self.remote = remote
        # True when a reused connection failed before the server said anything about this transaction:
        # the connection had gone stale while idle, and one fresh connection is worth a try.
        self.stale = stale


@dataclass(frozen=True)
class SessionSettings:
    helo_name: str
    tls_mode: str  # "opportunistic", "verify" or "none"
    connect_timeout: float
    greeting_timeout: float
    helo_timeout: float
    mail_timeout: float
    rcpt_timeout: float
    data_timeout: float
    data_block_timeout: float
    data_done_timeout: float
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)
    # RFC 2033 LMTP instead of SMTP: LHLO (no HELO fallback), one reply per accepted recipient after the data.
    lmtp: bool = False

    @classmethod
    def from_config(cls, config: DeliveryConfig, helo_name: str,
                    ssl_context: ssl.SSLContext | None = None) -> SessionSettings:
        return cls(helo_name=helo_name, tls_mode=config.tls, connect_timeout=config.connect_timeout,
                   greeting_timeout=config.greeting_timeout, helo_timeout=config.helo_timeout,
                   mail_timeout=config.mail_timeout, rcpt_timeout=config.rcpt_timeout,
                   data_timeout=config.data_timeout, data_block_timeout=config.data_block_timeout,
                   data_done_timeout=config.data_done_timeout,
                   ssl_context=ssl_context or client_ssl_context(config.tls))


def client_ssl_context(tls_mode: str) -> ssl.SSLContext:
    """Opportunistic TLS encrypts without checking the certificate (RFC 7435: better than plain text);
    "verify" checks the chain and the host name against the system trust store."""
    context = ssl.create_default_context()
    if tls_mode != "verify":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class TransactionResult:
    """The reply that decided each recipient of one transaction (RCPT reply, or the reply to the message)."""

    replies: dict[str, Reply]
    message_sent: bool
    # True when the server answered 4xx to every RCPT: it takes no mail now (the next MX host may).
    all_recipients_deferred: bool = False


def _family(address: str) -> int:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return 4


def _completed(reply: Reply) -> bool:
    """RFC 5321 4.2.1: 2yz is a positive completion; 3yz to MAIL or RCPT would be a protocol error."""
    return 200 <= reply.code < 300


def _network_reply(text: str, enhanced: str = "4.4.2") -> Reply:
    return replies.delivery_trouble(text, enhanced)


class _ClientProtocol(asyncio.Protocol):
    """The transport's events, handed to the session that owns the connection (one object per connection)."""

    def __init__(self, session: SmtpSession) -> None:
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session._data_received(data)

    def eof_received(self) -> bool:
        self.session._connection_lost(None)
        return False  # close our side too: a server that stopped talking takes no further commands

    def connection_lost(self, exc: Exception | None) -> None:
        self.session._connection_lost(exc)

    def pause_writing(self) -> None:
        self.session._paused = True

    def resume_writing(self) -> None:
        self.session._resume_writing()


class SmtpSession:
    def __init__(self, target: Target, settings: SessionSettings, source: Source = DEFAULT_SOURCE) -> None:
        self.target = target
        self.source = source
        self.remote = target.label
        self._settings = settings
        self._conn = ClientConnection()
        self._loop = asyncio.get_running_loop()
        self._protocol = _ClientProtocol(self)
        self._transport: asyncio.Transport | None = None
        # The one wait in progress: for a whole reply (`_reply_waiter`) or for the socket to drain (`_drained`).
        self._reply_waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        # Why the connection cannot be read any more: the server closed it (None inside `_lost`), a socket error,
        # or a reply that breaks the protocol (SmtpProtocolError, raised at the next read).
        self._lost = False
        self._lost_error: Exception | None = None
        # One read timer per session, moved lazily (an `asyncio.timeout` per read costs a timer and a context):
        # `_deadline` is when the reply being waited for is late; the timer fires at or before it.
        self._deadline = 0.0
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0
        self.capabilities = Capabilities.helo_only()
        self.transactions = 0
        # Most transactions on this connection before it is closed (traffic shaping); 0 = the cache's default.
        self.transaction_limit = 0
        self.tls = False
        self.last_used = time.monotonic()
        self._closed = False
        metrics.CONNECTIONS_OPEN.inc()

    @classmethod
    async def open(cls, target: Target, settings: SessionSettings, source: Source = DEFAULT_SOURCE) -> SmtpSession:
        """Connect (from `source.address` when set) and get the session ready; raises HostUnavailable."""
        local_addr = (source.address, 0) if source.address else None
        if local_addr is not None and ipaddress.ip_address(source.address).version != _family(target.address):
            raise HostUnavailable(_network_reply(
                f"egress source {source.name} ({source.address}) cannot reach {target.label}: other IP version",
                "4.4.1"), target.label)
        session = cls(target, settings, source)
        loop = session._loop
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: session._protocol, target.address, target.port, local_addr=local_addr),
                settings.connect_timeout)
        except BaseException as exc:
            session._closed = True
            metrics.CONNECTIONS_OPEN.dec()
            if isinstance(exc, TimeoutError):
                raise HostUnavailable(_network_reply(
                    f"connect to {target.label}:{target.port}: timed out", "4.4.1"), target.label) from None
            if isinstance(exc, OSError):
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise HostUnavailable(_network_reply(
                    f"connect to {target.label}:{target.port}: {why}", "4.4.1"), target.label) from None
            raise
        session._transport = transport
        try:
            await session._start()
        except BaseException:  # HostUnavailable, or the job being cancelled: never leave the socket open
            session.close()
            raise
        return session

    # -- the transport's events (through _ClientProtocol) -----------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        if self._lost:
            return
        try:
            self._conn.receive_data(data)
        except SmtpProtocolError as exc:
            self._lost, self._lost_error = True, exc
            self._wake()
            return
        if self._reply_waiter is not None and self._conn.reply_ready:
            self._wake()

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost, self._lost_error = True, exc
        self._wake()
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _resume_writing(self) -> None:
        self._paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake(self) -> None:
        waiter = self._reply_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        self._deadline = deadline
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._fire)
            self._timer_at = deadline

    def _fire(self) -> None:
        """The read timer: a wait still going at its deadline fails with TimeoutError; one whose deadline moved
        on gets the timer again; with no wait, the timer is dropped."""
        self._timer = None
        waiters = [w for w in (self._reply_waiter, self._drained) if w is not None and not w.done()]
        if not waiters:
            return
        if self._loop.time() < self._deadline - TIMER_SLACK:  # moved on (uvloop may fire a little early)
            self._timer = self._loop.call_at(self._deadline, self._fire)
            self._timer_at = self._deadline
            return
        for waiter in waiters:
            waiter.set_exception(TimeoutError())

    async def _start(self) -> None:
        greeting = await self._read("greeting", self._settings.greeting_timeout)
        if greeting.code != 220:
            # RFC 5321 3.1: 554 instead of 220 means "no service here"; any way, this host is not usable now.
            raise HostUnavailable(greeting, self.remote)
        await self._hello()
        if self._settings.tls_mode != "none" and self.capabilities.starttls:
            await self._starttls()
        elif self._settings.tls_mode == "verify":
            raise HostUnavailable(replies.starttls_required(self.remote), self.remote)

    async def _hello(self) -> None:
        if self._settings.lmtp:
            lhlo = await self._command(Command.lhlo(self._settings.helo_name), self._settings.helo_timeout)
            if lhlo.code != 250:
                raise HostUnavailable(lhlo, self.remote)
            self.capabilities = Capabilities.from_ehlo(lhlo)
            return
        ehlo = await self._command(Command.ehlo(self._settings.helo_name), self._settings.helo_timeout)
        if ehlo.code == 250:
            self.capabilities = Capabilities.from_ehlo(ehlo)
            return
        if ehlo.is_permanent:
            helo = await self._command(Command.helo(self._settings.helo_name), self._settings.helo_timeout)
            if helo.code == 250:
                self.capabilities = Capabilities.helo_only()
                return
            raise HostUnavailable(helo, self.remote)
        raise HostUnavailable(ehlo, self.remote)

    async def _starttls(self) -> None:
        reply = await self._command(Command.starttls(), self._settings.helo_timeout)
        if reply.code != 220:
            if self._settings.tls_mode == "verify":
                raise HostUnavailable(reply, self.remote)
            return  # RFC 3207 4: the server may refuse; opportunistic TLS then goes on in plain text
        if self._conn.awaiting or self._conn.has_unread_bytes:
            # Bytes after the 220 and before the handshake would be read as if they had come over TLS
            # (the STARTTLS injection family, CVE-2011-0411): refuse the host.
            raise HostUnavailable(_network_reply(f"{self.remote} sent data after 220 to STARTTLS", "4.7.5"),
                                  self.remote)
        context = self._settings.ssl_context or client_ssl_context(self._settings.tls_mode)
        server_name = self.target.name if self._settings.tls_mode == "verify" else None
        transport = self._transport
        assert transport is not None
        try:
            upgraded = await self._loop.start_tls(transport, self._protocol, context, server_hostname=server_name,
                                                  ssl_handshake_timeout=self._settings.helo_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            raise HostUnavailable(_network_reply(f"TLS handshake with {self.remote} failed: {exc}", "4.7.5"),
                                  self.remote) from None
        if upgraded is None:  # the connection went away during the handshake
            raise HostUnavailable(_network_reply(f"TLS handshake with {self.remote} failed: connection lost",
                                                 "4.7.5"), self.remote)
        self._transport = upgraded
        self.tls = True
        self._conn = ClientConnection.after_starttls()
        # RFC 3207 4.2: forget what the server said before TLS and ask again.
        await self._hello()

    async def transaction(self, sender: str, recipients: list[str], body: bytes) -> TransactionResult:
        """One mail transaction. Raises HostUnavailable (see the module docstring)."""
        caps = self.capabilities
        reused = self.transactions > 0
        self.transactions += 1
        self.last_used = time.monotonic()
        size = len(body) if caps.size_limit is not None else None
        smtputf8 = caps.smtputf8 and not (sender.isascii() and all(r.isascii() for r in recipients))
        mail = Command.mail(sender, size=size, body_8bit=caps.eight_bit_mime and has_8bit(body), smtputf8=smtputf8)
        rcpts = [Command.rcpt(recipient) for recipient in recipients]
        replies: dict[str, Reply] = {}
        try:
            if caps.pipelining:
                await self._write(self._conn.send_group([mail, *rcpts, Command.data()]), self._settings.mail_timeout)
                mail_reply = await self._read_first("MAIL", self._settings.mail_timeout, reused)
                # Each reply is checked for 421 as it comes: the server closes right after it (RFC 5321 3.8),
                # and its words are worth more than "connection lost" on the next read.
                self._raise_if_closing(mail_reply)
                for recipient in recipients:
                    replies[recipient] = await self._read("RCPT", self._settings.rcpt_timeout)
                    self._raise_if_closing(replies[recipient])
                data_reply = await self._read("DATA", self._settings.data_timeout)
            else:
                await self._write(self._conn.send(mail), self._settings.mail_timeout)
                mail_reply = await self._read_first("MAIL", self._settings.mail_timeout, reused)
                data_reply = None
                if _completed(mail_reply):
                    for recipient, command in zip(recipients, rcpts, strict=True):
                        replies[recipient] = await self._command(command, self._settings.rcpt_timeout)
                        self._raise_if_closing(replies[recipient])
            self._raise_if_closing(mail_reply)
            if not _completed(mail_reply):
                if mail_reply.is_transient:
                    raise HostUnavailable(mail_reply, self.remote)
                await self._abort_transaction(data_reply)
                return TransactionResult(dict.fromkeys(recipients, mail_reply), message_sent=False)
            accepted = [r for r in recipients if _completed(replies[r])]
            if not accepted:
                await self._abort_transaction(data_reply)
                all_transient = bool(replies) and all(reply.is_transient for reply in replies.values())
                return TransactionResult(replies, message_sent=False, all_recipients_deferred=all_transient)
            if data_reply is None:
                data_reply = await self._command(Command.data(), self._settings.data_timeout)
            self._raise_if_closing(data_reply)
            if data_reply.code != 354:
                await self._abort_transaction(None)
                return TransactionResult({**replies, **dict.fromkeys(accepted, data_reply)}, message_sent=False)
            if self._settings.lmtp:
                await self._send_message(body, len(accepted))
                return TransactionResult({**replies, **await self._read_lmtp_replies(accepted)}, message_sent=True)
            await self._send_message(body, 1)
            final = await self._read("message", self._settings.data_done_timeout)
            self._raise_if_closing(final)
            return TransactionResult({**replies, **dict.fromkeys(accepted, final)}, message_sent=True)
        except BaseException:  # HostUnavailable, or the job being cancelled: the conversation is unusable
            self.close()
            raise

    async def _send_message(self, body: bytes, replies: int) -> None:
        """The message after 354, owing `replies` replies: in one write, or a big body without a copy."""
        timeout = self._settings.data_block_timeout
        if len(body) < BIG_MESSAGE:
            await self._write(self._conn.send_message(body, replies), timeout)
            return
        for part in self._conn.send_message_parts(body, replies):
            if part:
                await self._write(part, timeout)

    async def _read_lmtp_replies(self, accepted: list[str]) -> dict[str, Reply]:
        """RFC 2033 4.2: one reply per accepted recipient, in RCPT order. When the server stops answering (it
        crashed, or said 421), the recipients answered so far keep their replies and only the rest get the
        failure: those already stored must not be delivered twice. The session is closed then."""
        decided: dict[str, Reply] = {}
        for recipient in accepted:
            try:
                reply = await self._read("message", self._settings.data_done_timeout)
            except HostUnavailable as exc:
                self.close()
                return {**decided, **dict.fromkeys(accepted[len(decided):], exc.reply)}
            decided[recipient] = reply
            if reply.code == 421:
                self.close()
                return {**decided, **dict.fromkeys(accepted[len(decided):], reply)}
        return decided

    async def _abort_transaction(self, pipelined_data_reply: Reply | None) -> None:
        """Leave the connection ready for the next transaction after one that sent no message."""
        if pipelined_data_reply is not None and pipelined_data_reply.code == 354:
            # RFC 2920 3.1: DATA was accepted although no recipient was: end it with an empty message.
            await self._write(self._conn.send_message(b""), self._settings.data_block_timeout)
            await self._read("message", self._settings.data_done_timeout)
        reply = await self._command(Command.rset(), self._settings.helo_timeout)
        self._raise_if_closing(reply)
        if reply.code != 250:
            raise HostUnavailable(reply, self.remote)

    def _raise_if_closing(self, reply: Reply) -> None:
        # RFC 5321 3.8: 421 means the server is closing the connection.
        if reply.code == 421:
            raise HostUnavailable(reply, self.remote)

    async def _read_first(self, what: str, timeout: float, reused: bool) -> Reply:
        """The first reply of a transaction. On a reused connection, a drop or 421 here means it went stale."""
        try:
            reply = await self._read(what, timeout)
        except HostUnavailable as exc:
            exc.stale = reused
            raise
        if reused and reply.code == 421:
            raise HostUnavailable(reply, self.remote, stale=True)
        return reply

    async def _command(self, command: Command, timeout: float) -> Reply:
        await self._write(self._conn.send(command), timeout)
        return await self._read(command.verb, timeout)

    async def _write(self, data: bytes, timeout: float) -> None:
        """Send `data`, waiting (at most `timeout` per block) only while the transport holds more than its high
        water mark: a command group or a small message goes out in one write with no wait at all."""
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            raise HostUnavailable(_network_reply(f"lost connection with {self.remote} while sending"), self.remote)
        try:
            if len(data) <= WRITE_BLOCK:
                transport.write(data)
                if self._paused:
                    await self._drain(timeout)
                return
            view = memoryview(data)
            for start in range(0, len(data), WRITE_BLOCK):
                transport.write(view[start:start + WRITE_BLOCK])
                if self._paused:
                    await self._drain(timeout)
        except TimeoutError:
            raise HostUnavailable(_network_reply(f"timeout writing to {self.remote}"), self.remote) from None
        except (OSError, RuntimeError) as exc:
            raise HostUnavailable(_network_reply(f"lost connection with {self.remote} while sending: {exc}"),
                                  self.remote) from None

    async def _drain(self, timeout: float) -> None:
        """Wait until the transport takes more (resume_writing), within `timeout`."""
        while self._paused:
            if self._lost:
                raise HostUnavailable(_network_reply(f"lost connection with {self.remote} while sending"),
                                      self.remote)
            self._drained = self._loop.create_future()
            self._arm(timeout)
            try:
                await self._drained
            finally:
                self._drained = None

    async def _read(self, what: str, timeout: float) -> Reply:
        """The next reply, which must answer `what`."""
        try:
            # Replies to a pipelined group usually arrive together: those already here need no wait.
            answer = self._conn.next_reply()
            if answer is None:
                answer = await self._receive_reply(what, timeout)
        except SmtpProtocolError as exc:
            raise HostUnavailable(replies.remote_protocol_error(f"protocol error from {self.remote} after {what}: "
                                                                f"{exc}"), self.remote) from None
        command, reply = answer
        if command != what:
            raise HostUnavailable(replies.remote_protocol_error(f"protocol error: {self.remote} answered {command} "
                                                                f"while {what} was expected"), self.remote)
        return reply

    async def _receive_reply(self, what: str, timeout: float) -> tuple[str, Reply]:
        """Wait until the protocol has a whole reply (SmtpProtocolError for a broken one)."""
        while True:
            if self._lost:
                error = self._lost_error
                if isinstance(error, SmtpProtocolError):
                    raise error
                if error is None:
                    text = f"lost connection with {self.remote} while waiting for the reply to {what}"
                else:
                    text = f"lost connection with {self.remote}: {error}"
                raise HostUnavailable(_network_reply(text), self.remote)
            waiter = self._reply_waiter = self._loop.create_future()
            self._arm(timeout)
            try:
                await waiter
            except TimeoutError:
                text = f"timeout after {timeout:g}s waiting for the reply to {what} from {self.remote}"
                raise HostUnavailable(_network_reply(text), self.remote) from None
            finally:
                self._reply_waiter = None
            answer = self._conn.next_reply()
            if answer is not None:
                return answer

    @property
    def usable(self) -> bool:
        """Worth keeping for another transaction: open, not closed by the server meanwhile, and nothing received
        that nobody asked for (e.g. a 421 while idle)."""
        transport = self._transport
        return (not self._closed and not self._lost and transport is not None and not transport.is_closing()
                and not self._conn.has_unread_bytes)

    def close(self, polite: bool = False) -> None:
        """Close now. `polite` sends QUIT first without waiting for its reply (RFC 5321 4.1.1.10 asks for
        QUIT; waiting for the 221 would only delay us); otherwise (a failed conversation) the connection is
        aborted: unsent bytes are dropped, so a server that stopped reading does not keep it open."""
        if self._closed:
            return
        self._closed = True
        metrics.CONNECTIONS_OPEN.dec()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if transport is None:
            return
        if polite and not self._lost and not transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write(Command.quit().line)
            transport.close()  # after the QUIT has gone out
        else:
            transport.abort()  # an unusable conversation: what it still had to send is dropped, not flushed
