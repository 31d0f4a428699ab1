"""One inbound SMTP session: feeds a socket's bytes to the sans-I/O server and answers its decision events.

Input: a transport (`InboundSession` is the asyncio protocol of each accepted connection), the `Listener` it
arrived on and its `SessionHost` (the frontend: connection limits, shard client). On a listener behind a load
balancer (`smtp.proxy_protocol`) the connection starts with a PROXY v1/v2 header naming the real client (read
within PROXY_HEADER_TIMEOUT, at most PROXY_HEADER_MAX bytes, else the connection is closed unanswered).
The protocol (framing, syntax, order, limits)
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
- STARTTLS (RFC 3207): 220, then the TLS handshake on the same connection (`loop.start_tls`), then the
  protocol starts over (`ServerConnection.starttls_completed`) with the after-TLS settings (no STARTTLS, AUTH
  offered). On an implicit-TLS listener (RFC 8314) the session starts under TLS with those settings.
Timeouts: the command or data timeout from the configuration, whichever the protocol state calls for, while
the session waits for its client (the TLS handshake gets the command timeout). Stopping: `stop()` answers
421 4.3.2 and closes, at once or, while a message is being stored, right after its 250 or 451.
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
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from cluster import logs
from cluster.config import SmtpConfig
from cluster.frontend import metrics
from cluster.frontend.auth import SmtpAuth, Step, Verify
from cluster.frontend.deadline import Deadlines
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
from cluster.smtp.proxy import ProxyHeaderError, parse_proxy_header
from cluster.smtp.replies import Reply
from cluster.smtp.server import NeedData, Paused, ServerConnection, ServerSettings, State
from cluster.users import UserDatabase, UsersFileError

log = logging.getLogger(__name__)

# The machine's states this module looks at per read, as module constants (an enum member looked up on its class
# costs ~0.35 us on Python 3.11, see cluster/smtp/server.py).
_BDAT = State.BDAT
_CLOSED = State.CLOSED
_DATA = State.DATA

# A PROXY v2 header is 16 bytes plus at most 65535; balancers send far less. Refuse anything bigger.
PROXY_HEADER_MAX = 4096
PROXY_HEADER_TIMEOUT = 10.0


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

    Counted as plain numbers per verb and per reply code for the whole process (`metrics.count_command`,
    `metrics.count_reply`), added to the series when the registry is read: a locked counter increment per
    command and per reply cost more than the rest of handling a RCPT, and a tally per session handed over at
    its end cost a dozen more steps per message. Rejections are counted at once."""

    def __init__(self, listener: str) -> None:
        self.listener = listener

    def command(self, verb: str) -> None:
        metrics.count_command(verb)

    def reply(self, reply: Reply) -> None:
        code = reply.code
        metrics.count_reply(code)
        if code >= 400:
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


class _Rest:
    """The rest of a coroutine that was started outside any task and had to wait: awaiting this in a task runs it
    to its end there, passing what it waits for (futures) to the task and what the task sends (results,
    cancellation) back to it, as if the task had run it from the start."""

    __slots__ = ("_coroutine", "_waiting_for")

    def __init__(self, coroutine: Coroutine[object, None, bool], waiting_for: object) -> None:
        self._coroutine = coroutine
        self._waiting_for = waiting_for

    def __await__(self) -> Generator[object, None, bool]:
        coroutine, waiting_for = self._coroutine, self._waiting_for
        while True:
            try:
                sent = yield waiting_for
            except BaseException as exc:  # everything thrown in (CancelledError) goes through
                try:
                    waiting_for = coroutine.throw(exc)
                except StopIteration as done:
                    return cast(bool, done.value)
            else:
                try:
                    waiting_for = coroutine.send(sent)
                except StopIteration as done:
                    return cast(bool, done.value)


class SessionHost(Protocol):
    """What a session needs from the frontend process that accepted it (`cluster.frontend.server.Frontend`)."""

    @property
    def shards(self) -> ShardClient | None: ...

    @property
    def deadlines(self) -> Deadlines: ...

    def admit(self, session: InboundSession, client_ip: str) -> Reply | None:
        """Register a session that starts SMTP; the refusal (421) when a connection limit says no."""

    def release(self, session: InboundSession) -> None:
        """The session is over (called once, for admitted sessions only)."""

    def may_relay(self, client_ip: str) -> bool:
        """Whether the client address is in `smtp.relay_networks`."""


class InboundSession(asyncio.Protocol):
    """One SMTP connection, driven by the transport's callbacks (no task per connection, no stream objects).

    data_received feeds the bytes to the `ServerConnection` and answers what it can at once; every reply of a
    batch leaves in one transport.write. A decision that needs the policy (MAIL, RCPT, end of DATA, AUTH,
    STARTTLS) runs in a task of its own, and reading is paused until it answered (the machine keeps what was
    pipelined meanwhile, so replies stay in order). One timer per session enforces the command and data
    timeouts while the session waits for its client."""

    def __init__(self, host: SessionHost, *, config: SmtpConfig, listener: Listener, security: Security,
                 proxy_protocol: bool = False, client_ip: str | None = None, counted_already: bool = False) -> None:
        self.host = host
        self.config = config
        self.listener = listener
        self.policy = listener.policy
        self.security = security
        # Set after the PROXY header (if any): the client's address, the machine and what the policy knows.
        self.client_ip = client_ip or "unknown"
        self._proxy_ip = client_ip
        # An implicit-TLS connection is counted against max_connections from its accept (its handshake task).
        self.counted_already = counted_already
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.observer = _MetricsObserver(listener.kind)
        self.auth = SmtpAuth(config.max_auth_failures)
        self.facts = SessionFacts(client_ip=self.client_ip, listener=listener.kind, tls=listener.implicit_tls,
                                  trusted_network=False)
        # True while a message is being stored: a graceful shutdown lets these sessions answer first.
        self.storing = False
        self._proxy_buffer: bytes | None = b"" if proxy_protocol else None
        # The decision being made while the session waits for something (reading is paused meanwhile), the future
        # it waits for, or the task that finishes it (see `_advance`).
        self._decision: Coroutine[object, None, bool] | None = None
        self._waiting: asyncio.Future[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._admitted = False
        self._lost = False
        self._stopping = False  # the frontend is stopping: 421 4.3.2 as soon as no message is being stored
        self._writing_paused = False
        self._reading_paused = False
        # When the client must have sent more (loop.time()); None: not waiting for it. Enforced by the frontend's
        # one sweep over all sessions (cluster.frontend.deadline), which calls expired().
        self.deadline: float | None = None
        self._command_timeout = float(config.command_timeout)
        self._data_timeout = float(config.data_timeout)  # while reading message content (DATA, BDAT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed_waiters: list[asyncio.Future[None]] = []

    @property
    def tls(self) -> bool:
        return self.facts.tls

    # --- transport callbacks ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        if not self.counted_already:  # an implicit-TLS connection was counted before its handshake
            metrics.count(metrics.connections(self.listener.kind))
        self._loop = asyncio.get_running_loop()
        self.host.deadlines.watch(self)
        if self._proxy_ip is None:
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if peer else "unknown"
        # No TCP_NODELAY here: uvloop and asyncio set it on every TCP transport they make.
        if self._proxy_buffer is not None:
            self._arm(PROXY_HEADER_TIMEOUT)
            return
        self._begin(b"")

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            if self._proxy_buffer is not None:
                self._proxy_data(data)
            return
        conn.receive_data(data)
        if self._decision is None:
            self._process()

    def eof_received(self) -> bool | None:
        self.data_received(b"")
        # Keep a plain transport open until the replies are flushed (TLS transports cannot half-close).
        return None if self.tls else True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None:
            log.debug("session with %s ended: %s", self.client_ip, exc)
        self.deadline = None
        self.host.deadlines.forget(self)
        if self._decision is not None and not self.storing:
            self._cancel_decision()  # a policy check for a client that is gone; a store finishes
        self._finish()

    def pause_writing(self) -> None:
        self._writing_paused = True  # the client is not reading its replies: read no more commands either
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # --- the frontend's side --------------------------------------------------------------------------------

    def stop(self) -> None:
        """The frontend is stopping: 421 4.3.2 and close now, or once the message being stored is answered."""
        self._stopping = True
        if self.storing:
            return
        if self._decision is not None:
            self._cancel_decision()  # 421 when it ends (cancelled or not)
            return
        self._shut_down()

    def abort(self) -> None:
        """Close at once, even a session still storing (the end of a shutdown that waited long enough)."""
        if self._lost:
            return
        if self._decision is not None:
            self._cancel_decision()
        if self.transport is not None:
            self.transport.abort()
        self._lost = True  # nothing more is written; connection_lost follows

    async def wait_closed(self) -> None:
        if self._lost and self._decision is None:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed_waiters.append(waiter)
        await waiter

    # --- internals ------------------------------------------------------------------------------------------

    def _proxy_data(self, data: bytes) -> None:
        """Bytes before SMTP on a listener behind a balancer: the PROXY header, maybe followed by SMTP."""
        assert self._proxy_buffer is not None
        buffered = self._proxy_buffer + data
        try:
            if not data:
                raise ProxyHeaderError("connection closed before the PROXY header ended")
            header = parse_proxy_header(buffered)
            if header is None:
                if len(buffered) > PROXY_HEADER_MAX:
                    raise ProxyHeaderError("PROXY header too long")
                self._proxy_buffer = buffered
                return
        except ProxyHeaderError as exc:
            self._refuse_proxy(exc)
            return
        self._proxy_buffer = None
        # LOCAL / UNKNOWN (health checks): the balancer speaks for itself.
        self.client_ip = header.client_ip or self.client_ip
        self._begin(buffered[header.consumed:])

    def _refuse_proxy(self, why: Exception) -> None:
        log.info("connection from %s refused: bad PROXY protocol header: %s", self.client_ip, why)
        metrics.CONNECTIONS_REFUSED.labels(reason="proxy_header").inc()
        self._proxy_buffer = None
        self._forget_deadline()
        if self.transport is not None:
            self.transport.close()

    def _begin(self, initial_data: bytes) -> None:
        """Apply the connection limits, then greet (and take what the client sent after a PROXY header)."""
        transport = self.transport
        assert transport is not None
        refusal = self.host.admit(self, self.client_ip)
        if refusal is not None:
            transport.write(refusal.to_bytes())
            transport.close()
            self._forget_deadline()
            return
        self._admitted = True
        metrics.count(metrics.CONNECTIONS_CURRENT)
        self.facts.client_ip = self.client_ip
        self.facts.trusted_network = self.host.may_relay(self.client_ip)
        self.conn = ServerConnection(self.listener.settings, observer=self.observer)
        self.conn.start()
        if initial_data:
            self.conn.receive_data(initial_data)
        self._process()

    def _process(self) -> None:
        """Run the machine until it needs more input or a decision must wait; then write what it said."""
        conn = self.conn
        assert conn is not None
        while True:
            event = conn.next_event()
            if event is NeedData or event is Paused:
                break
            if isinstance(event, SessionEnded):
                break
            self._sync_facts()
            decision: Coroutine[object, None, bool]
            if isinstance(event, MailRequested):
                decision = self._mail(event)
            elif isinstance(event, RcptRequested):
                if self.policy.settles_rcpt(self.facts):  # nothing to ask (a trusted client): no coroutines
                    self._rcpt_accepted(event)
                    continue
                decision = self._rcpt(event)
            elif isinstance(event, MessageReceived):
                decision = self._message(event)
            elif isinstance(event, ExtensionCommand) and event.verb == "STARTTLS":
                decision = self._starttls(event.argument)
            elif isinstance(event, ExtensionCommand):
                decision = self._auth_command(event.argument)
            else:
                assert isinstance(event, ExtensionLine)
                decision = self._auth_step(self.auth.line(event.line))
            # The decision runs here, at once. When it has to wait (a shard, DNS, a thread), reading pauses and it
            # goes on when what it waits for is done (`_advance`); MAIL and RCPT rarely wait.
            go_on = self._advance(decision)
            if go_on is None:
                self.deadline = None
                self._update_reading()
                break
            if not go_on:
                self._flush()
                self._close()
                return
        # _flush, _arm and the machine's `closed` written out: this runs for every read of every session.
        data = conn.data_to_send()
        if data:
            self._write(data)
        state = conn.state
        if state is _CLOSED:
            self._close()
        elif self._decision is None:  # conn.current_timeout_kind: the data timeout while reading content
            loop = self._loop
            assert loop is not None
            reading_content = state is _DATA or state is _BDAT
            self.deadline = loop.time() + (self._data_timeout if reading_content else self._command_timeout)

    # A decision (a coroutine) is run by the session itself, not by an asyncio task: a task per MAIL, RCPT and
    # message cost more than the rest of answering them. The coroutine is sent None until it ends; when it
    # yields a future (it awaits one), it goes on from that future's done callback, as a task would go on
    # (a cancelled future raises CancelledError inside it, as in a task). Anything else it may yield (the bare
    # yield of asyncio.sleep(0)) is left to a task, which finishes it (`_Rest`). Code that needs to run inside a
    # task (asyncio.timeout, current_task) cannot be called from a decision.

    def _advance(self, decision: Coroutine[object, None, bool]) -> bool | None:
        """Run `decision` until it ends (its result; False when it failed) or waits (None; `_decision` is set)."""
        try:
            waiting_for = decision.send(None)
        except StopIteration as done:
            return bool(done.value)
        except (ConnectionError, OSError) as exc:
            log.debug("session with %s ended: %s", self.client_ip, exc)
            return False
        except Exception:  # a bug in a check: this session ends (its earlier replies flushed), the others go on
            log.exception("session with %s: a decision failed", self.client_ip)
            return False
        self._decision = decision
        if asyncio.isfuture(waiting_for) and getattr(waiting_for, "_asyncio_future_blocking", False):
            waiting_for._asyncio_future_blocking = False  # what a task does with the future it is given
            self._waiting = waiting_for
            waiting_for.add_done_callback(self._resume)
        else:
            self._task = asyncio.get_running_loop().create_task(self._finish_in_task(_Rest(decision, waiting_for)))
        return None

    def _resume(self, future: asyncio.Future[Any]) -> None:
        """The future the decision waited for is done: go on with it."""
        decision = self._decision
        if future is not self._waiting or decision is None:
            return
        self._waiting = None
        self._decision = None
        try:
            go_on = self._advance(decision)
        except asyncio.CancelledError:
            self._cancelled()
            return
        except Exception:  # a bug in a check: this session ends, the others go on
            log.exception("session with %s: a decision failed", self.client_ip)
            go_on = False
        if go_on is not None:
            self._decided(go_on)

    async def _finish_in_task(self, rest: _Rest) -> None:
        try:
            go_on = await rest
        except asyncio.CancelledError:
            # Not re-raised: this task is a leaf nobody awaits.
            self._task = self._decision = None
            self._cancelled()
            return
        except (ConnectionError, OSError) as exc:
            log.debug("session with %s ended: %s", self.client_ip, exc)
            go_on = False
        except Exception:
            log.exception("session with %s: a decision failed", self.client_ip)
            go_on = False
        self._task = self._decision = None
        self._decided(go_on)

    def _cancel_decision(self) -> None:
        """Stop the decision being made (connection_lost, stop, abort); it may end normally all the same."""
        if self._task is not None:
            self._task.cancel()
        elif self._waiting is not None:
            self._waiting.cancel()

    def _cancelled(self) -> None:
        """The decision was cancelled: by connection_lost (the client is gone) or stop() (the frontend is
        stopping)."""
        if self._lost:
            self._finish()
        elif self._stopping:
            self._shut_down()
        else:
            self._close()

    def _decided(self, go_on: bool) -> None:
        """The decision that was waiting has answered: the session goes on, or ends."""
        if self._lost:
            self._finish()
            return
        if self._stopping:
            self._shut_down()
            return
        if not go_on:
            self._flush()
            self._close()
            return
        self._update_reading()
        self._process()

    def _sync_facts(self) -> None:
        """Copy what the protocol machine learnt (HELO name, end of a transaction) into the policy's facts."""
        conn = self.conn
        assert conn is not None
        facts = self.facts
        facts.helo = conn.helo_name
        if not conn.in_transaction and (facts.sender is not None or facts.recipients or facts.trace_headers
                                        or facts.reservation):
            facts.sender = None
            facts.recipients = []
            facts.trace_headers = []
            facts.reservation = ""

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        paused = self._decision is not None or self._writing_paused
        if paused != self._reading_paused:
            self._reading_paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _write(self, data: bytes) -> None:
        """Write unless the connection is closing (a client gone, or a session ending, never writes again)."""
        transport = self.transport
        if transport is not None and not self._lost and not transport.is_closing():
            transport.write(data)

    def _flush(self) -> None:
        conn = self.conn
        if conn is not None:
            data = conn.data_to_send()
            if data:
                self._write(data)

    def _close(self) -> None:
        self._forget_deadline()
        if self.transport is not None and not self._lost:
            self.transport.close()  # what was written still goes out first

    def _shut_down(self) -> None:
        """421 4.3.2 (the frontend is stopping) after whatever the session still had to say; then close."""
        self._flush()
        transport = self.transport
        if transport is not None and not self._lost and not transport.is_closing():
            transport.write(replies.SHUTTING_DOWN.to_bytes())
            self.observer.reply(replies.SHUTTING_DOWN)
        self._close()

    def _finish(self) -> None:
        """The connection is gone and no decision runs any more: count and forget the session (once)."""
        if self._decision is not None:
            return
        self._forget_deadline()
        if self._admitted:
            self._admitted = False
            metrics.count(metrics.CONNECTIONS_CURRENT, -1.0)
            self.host.release(self)
        for waiter in self._closed_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._closed_waiters.clear()

    def _arm(self, seconds: float) -> None:
        assert self._loop is not None
        self.deadline = self._loop.time() + seconds

    def _forget_deadline(self) -> None:
        self.deadline = None

    def expired(self) -> None:
        """The deadline passed while the session waited for its client (called by the frontend's sweep)."""
        if self._lost:
            return
        if self._proxy_buffer is not None:
            self._refuse_proxy(TimeoutError(f"no PROXY header within {PROXY_HEADER_TIMEOUT:g}s"))
            return
        if self.conn is None or self._decision is not None:
            return
        metrics.rejections("timeout", self.listener.kind).inc()
        self.conn.timed_out()
        self._process()

    def _count_refusal(self, reply: Reply | None) -> None:
        if reply is not None:
            metrics.rejections(rejection_reason(reply), self.listener.kind).inc()

    # --- decisions (each runs in a task; True: the session goes on) -----------------------------------------

    async def _mail(self, event: MailRequested) -> bool:
        assert self.conn is not None
        refusal = await self.policy.check_mail(self.facts, event.sender, event.params)
        self._count_refusal(refusal)
        if refusal is None:
            self.facts.sender = event.sender
        self.conn.respond(refusal or replies.SENDER_OK)
        return True

    async def _rcpt(self, event: RcptRequested) -> bool:
        assert self.conn is not None
        refusal = await self.policy.check_rcpt(self.facts, event.recipient)
        self._count_refusal(refusal)
        if refusal is None:
            self.facts.recipients.append(event.recipient)
        self.conn.respond(refusal or replies.RECIPIENT_OK)
        return True

    def _rcpt_accepted(self, event: RcptRequested) -> None:
        """`_rcpt` when the policy settles the RCPT without a question (`SessionPolicy.settles_rcpt`)."""
        assert self.conn is not None
        self.facts.recipients.append(event.recipient)
        self.conn.respond(replies.RECIPIENT_OK)

    async def _message(self, event: MessageReceived) -> bool:
        assert self.conn is not None
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
        return True

    async def _starttls(self, argument: str) -> bool:
        """RFC 3207 4: answer 220, handshake, start over. False when the session must end (failed handshake)."""
        conn = self.conn
        assert conn is not None and self.transport is not None
        context = self.security.tls_context
        if self.tls or context is None:
            conn.respond(replies.TLS_ALREADY_ACTIVE)
            return True
        if argument.strip(" "):
            conn.respond(replies.STARTTLS_SYNTAX)
            return True
        # What the client pipelined behind STARTTLS is in the machine's buffer; answering 220 drops it (RFC 3207
        # 4.2). Reading is paused, so nothing more reaches us before the TLS layer takes the connection over.
        discarded = conn.buffered_input
        conn.respond(replies.READY_FOR_TLS)
        self.transport.write(conn.data_to_send())
        self._reading_paused = False  # the TLS transport that replaces this one starts reading
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=float(self.config.command_timeout))
        except OSError as exc:  # ssl.SSLError, ConnectionError and handshake timeouts are all OSErrors
            metrics.TLS_HANDSHAKES.labels(result="failure").inc()
            log.info("TLS handshake with %s failed: %s", self.client_ip, exc)
            self._lost_in_handshake()
            return False
        except BaseException:  # cancelled (the frontend stops) or a bug
            self._lost_in_handshake()
            raise
        if transport is None:  # the connection closed during the handshake
            self._lost_in_handshake()
            return False
        self.transport = transport
        if discarded:
            log.info("discarded %d plaintext bytes that %s sent after STARTTLS", discarded, self.client_ip)
        metrics.TLS_HANDSHAKES.labels(result="success").inc()
        self.facts.tls = True
        conn.starttls_completed()
        if self.security.tls_settings is not None:
            conn.settings = self.security.tls_settings
        return True

    def _lost_in_handshake(self) -> None:
        """A TLS handshake that did not complete: the connection belongs to the TLS layer, which does not tell this
        session when it closes (asyncio's and uvloop's SSL protocols call connection_lost only once the handshake
        is done). Close it and mark the session gone here, so that it is released when the decision ends."""
        if self.transport is not None:
            self.transport.abort()
        self._lost = True
        self.deadline = None
        self.host.deadlines.forget(self)

    async def _auth_command(self, argument: str) -> bool:
        """The AUTH command: the policy may refuse it before any exchange (e.g. a client guessing passwords)."""
        assert self.conn is not None
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
        conn = self.conn
        assert conn is not None
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
        conn.respond(reply)
        if reply.code == 421 and not conn.closed:
            return False  # the policy closes the session (RFC 5321 3.8)
        if self.auth.exhausted and not conn.closed:
            self._flush()
            self._write(replies.AUTH_TOO_MANY_FAILURES.to_bytes())
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
        conn = self.conn
        assert conn is not None
        ended = time.perf_counter()
        trace_id = new_trace_id()
        recipients = [str(r) for r in message.recipients]
        protocol = protocol_name(esmtp=conn.esmtp, smtputf8=message.smtputf8, tls=self.tls,
                                 authenticated=self.auth.user is not None)
        now = time.time()
        header = received_header(helo=conn.helo_name, client_ip=self.client_ip,
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
        if prepared is not None:
            header = prepared.header + header
        client = {"ip": self.client_ip, "helo": conn.helo_name or "", "protocol": protocol,
                  "trace_id": trace_id}
        if prepared is not None and prepared.pool:
            client["pool"] = prepared.pool
        shards = self.host.shards
        assert shards is not None  # sessions start only once the shard client is up
        # The header fields and the message are joined once, into the Inject frame (not into a body first).
        reply, queue_ids = await shards.inject(sender, recipients, data, client, head=header)
        if reply.is_positive:
            accepted, received = metrics.accepted(self.listener.kind)
            metrics.count(accepted)
            metrics.count(received, len(message.data))
            metrics.ACCEPT_LATENCY.observe(time.perf_counter() - ended)
            line = (f"accepted trace={trace_id} from=<{sender}> nrcpt={len(recipients)} size={len(message.data)} "
                    f"queue_ids={','.join(queue_ids)} client={self.client_ip} listener={self.listener.kind}"
                    f"{f' user={self.auth.user}' if self.auth.user is not None else ''}"
                    f"{f' dkim={prepared.dkim}' if prepared is not None and prepared.dkim else ''}")
            writer = logs.direct(log)  # the same line without the logging module's record and handler chain
            if writer is not None:
                writer.write(log, line)
            else:
                log.info("%s", line)
        else:
            reason = "disk_full" if reply.enhanced == "4.3.1" else "queue_unavailable"
            metrics.rejections(reason, self.listener.kind).inc()
            log.warning("not stored trace=%s from=<%s> reply=%s", trace_id, sender, reply)
        return reply

