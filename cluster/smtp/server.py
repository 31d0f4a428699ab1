"""Sans-I/O ESMTP server state machine (RFC 5321, with RFC 1870 SIZE, RFC 2920 PIPELINING, RFC 6152
8BITMIME, RFC 6531 SMTPUTF8, RFC 2034 ENHANCEDSTATUSCODES and, when enabled, RFC 3030 CHUNKING), in the
style of h11.

The glue owns the socket and calls: `start()` once, `receive_data(bytes)` with what arrived (b"" on EOF),
`next_event()` until it returns `NeedData`, `respond(reply)` for each decision event, and sends
`data_to_send()` to the client. When `closed` becomes True it flushes `data_to_send()` and closes.

States: `State` names them; the table `_OUT_OF_SEQUENCE` says which command each state refuses and with
what reply (503 5.5.1 "Send EHLO or HELO first", "Need MAIL before RCPT"...), the way h11's `_state.py` keeps
its transitions in tables. Transitions: EHLO/HELO -> GREETED; accepted MAIL -> MAIL; accepted RCPT -> RCPT;
354 -> DATA -> (end of data) -> GREETED; BDAT -> BDAT -> CHUNKING or, with LAST, GREETED; RSET -> GREETED
(or CONNECTED before EHLO); 334 -> AUTH_LINE -> back; 2xx to STARTTLS -> TLS_HANDSHAKE -> CONNECTED.

Decision events (MailRequested, RcptRequested, MessageReceived) pause the machine: until `respond()`,
`next_event()` returns `Paused` and new input is only buffered, so replies leave in command order even when
the client pipelines. The machine answers everything else itself (EHLO, RSET, NOOP, syntax errors, limits).
The glue should stop reading from the socket while `Paused` (back-pressure): input is buffered unbounded then.

Extensions the glue implements (STARTTLS, AUTH) are listed in `ServerSettings.extension_commands` and
`extra_extensions`; they arrive as `ExtensionCommand` / `ExtensionLine` decision events (see events.py).
An optional `SessionObserver` sees every command verb and every reply, for metrics.

Failure modes: every malformed input gets an SMTP reply from `cluster.smtp.replies`; after `max_errors`
client errors the session ends with 421 4.7.0. Client errors are: every 4xx/5xx the machine sends for bad
syntax, bad sequence, bad lines or a refused DATA, and every 4xx/5xx the glue answers to MAIL, RCPT or an
extension command (relay denied, failed AUTH). Not counted: 452 too many recipients (RFC 5321 4.5.3.1.10 says
the client should just continue in a new transaction) and the glue's answer to end of DATA (a storage
failure is not the client's fault). Calling `respond()` with no decision pending is a glue bug and
raises `ProtocolUsageError` (from `cluster.sansio`). Nothing here raises on any client input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from cluster.sansio import ByteMachine, NeedData, Paused, ProtocolUsageError
from cluster.smtp import replies
from cluster.smtp.address import (
    Address,
    SmtpSyntaxError,
    parse_forward_path,
    parse_mail_parameters,
    parse_reverse_path,
    plain_path,
    split_path_and_parameters,
)
from cluster.smtp.events import (
    DecisionEvent,
    Event,
    ExtensionCommand,
    ExtensionLine,
    MailRequested,
    MessageReceived,
    RcptRequested,
    SessionEnded,
)
from cluster.smtp.lines import OVERLONG, ChunkReader, CommandFramer, DataReader, DataResult
from cluster.smtp.replies import Reply

if TYPE_CHECKING:
    from cluster.config import SmtpConfig

# The events are re-exported so the glue can import the whole API from this module.
__all__ = [
    "Event",
    "ExtensionCommand",
    "ExtensionLine",
    "MailRequested",
    "MessageReceived",
    "NeedData",
    "Paused",
    "ProtocolUsageError",
    "RcptRequested",
    "ServerConnection",
    "ServerSettings",
    "SessionEnded",
    "SessionObserver",
    "State",
]

# Parameters this server implements on MAIL (RFC 1870, RFC 6152, RFC 6531); none on RCPT yet.
_MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8"})
_RCPT_PARAMETERS: frozenset[str] = frozenset()

# A command handler (an unbound ServerConnection method) takes the session and the text after the verb.
_Handler = Callable[["ServerConnection", str], None]


class SessionObserver(Protocol):
    """Optional hooks for metrics (commands_total{command}, replies_total{class}, rejections)."""

    def command(self, verb: str) -> None:
        """A command line was read; `verb` is one of the known verbs upper-cased, or "other"."""

    def reply(self, reply: Reply) -> None:
        """A reply was queued for the client (compare with `cluster.smtp.replies` constants for reasons)."""


# RFC 4954 4: an AUTH response line may be up to 12288 octets.
MAX_AUTH_LINE = 12288


@dataclass(frozen=True)
class ServerSettings:
    """What one session needs to know. The limits come from `cluster.config.SmtpConfig` (their defaults live
    there only): build with `from_config`, then `dataclasses.replace` what the glue implements."""

    hostname: str
    max_command_line: int  # octets incl. CRLF (RFC 5321 4.5.3.1.4)
    max_text_line: int  # octets incl. CRLF (RFC 5321 4.5.3.1.6)
    max_message_size: int  # advertised in EHLO SIZE (RFC 1870)
    max_recipients: int  # RFC 5321 4.5.3.1.8: the RCPT over the limit gets 452 4.5.3
    max_errors: int  # client errors before 421 4.7.0 and close
    # RFC 3030 CHUNKING: when on, EHLO advertises CHUNKING and BDAT is accepted.
    chunking: bool
    # Extra EHLO keywords (e.g. "STARTTLS", "AUTH PLAIN LOGIN") advertised once the glue implements them.
    extra_extensions: tuple[str, ...] = ()
    # Verbs (upper case) handed to the glue as ExtensionCommand events instead of 500 5.5.2, e.g. STARTTLS, AUTH.
    extension_commands: frozenset[str] = frozenset()
    max_continuation_line: int = MAX_AUTH_LINE
    # MAIL / RCPT parameter keywords (upper case) the glue implements (e.g. AUTH, RET, ENVID / NOTIFY, ORCPT):
    # passed through in the event's params for the glue to check, instead of 555 5.5.4.
    extra_mail_parameters: frozenset[str] = frozenset()
    extra_rcpt_parameters: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, smtp: SmtpConfig) -> ServerSettings:
        return cls(
            hostname=smtp.hostname,
            max_command_line=smtp.max_command_line,
            max_text_line=smtp.max_text_line,
            max_message_size=int(smtp.max_message_size),
            max_recipients=smtp.max_recipients,
            max_errors=smtp.max_errors,
            chunking=smtp.chunking,
        )


@functools.lru_cache(maxsize=16)
def _greeting(hostname: str) -> Reply:
    return replies.greeting(hostname)


@functools.lru_cache(maxsize=64)
def _extensions(settings: ServerSettings) -> tuple[str, ...]:
    """The EHLO keywords a session with these settings advertises (made once per settings, not per EHLO)."""
    return ("PIPELINING", f"SIZE {settings.max_message_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
            *(("CHUNKING",) if settings.chunking else ()), *settings.extra_extensions)


@functools.lru_cache(maxsize=1024)
def _ehlo_reply(hostname: str, name: str, settings: ServerSettings) -> Reply:
    """The EHLO reply; clients greet with a few names over and over, so the last 1,024 are kept (HELO too)."""
    return replies.ehlo_reply(hostname, name, _extensions(settings))


@functools.lru_cache(maxsize=1024)
def _helo_reply(hostname: str, name: str) -> Reply:
    return replies.helo_reply(hostname, name)


class State(Enum):
    """Where a session is. Commands are read in the five command states; `_OUT_OF_SEQUENCE` says which
    commands each of them refuses, and with what (RFC 5321 4.1.4, 4.3.2)."""

    CONNECTED = "connected"  # greeting sent, no EHLO/HELO yet
    GREETED = "greeted"  # EHLO/HELO accepted, no mail transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet (RFC 5321 3.3)
    RCPT = "rcpt"  # at least one recipient accepted
    CHUNKING = "chunking"  # RFC 3030: a BDAT chunk (not LAST) was accepted; DATA is no longer possible
    DATA = "data"  # after 354: reading the message content up to CRLF.CRLF
    BDAT = "bdat"  # reading the octets of one BDAT chunk (also of a refused one, to skip it)
    AUTH_LINE = "auth_line"  # after a 334: the next line answers the challenge, it is no command (RFC 4954 4)
    TLS_HANDSHAKE = "tls_handshake"  # after a 2xx to STARTTLS, until starttls_completed() (RFC 3207 4.2)
    CLOSED = "closed"

    # Identity, as equality is: Enum's own hash is computed in Python, and (verb, state) is looked up per command.
    __hash__ = object.__hash__


COMMAND_STATES = frozenset({State.CONNECTED, State.GREETED, State.MAIL, State.RCPT, State.CHUNKING})
TRANSACTION_STATES = frozenset({State.MAIL, State.RCPT, State.CHUNKING})

# The state table: a command in a state listed here is refused with that reply; every other (command, state)
# pair among the command states is accepted. Verbs not listed at all (EHLO, HELO, RSET, NOOP, QUIT, HELP, VRFY,
# EXPN, and the glue's extension verbs) are accepted in every command state.
_OUT_OF_SEQUENCE: dict[tuple[str, State], Reply] = {
    ("MAIL", State.CONNECTED): replies.NEED_HELO,
    ("MAIL", State.MAIL): replies.NESTED_MAIL,
    ("MAIL", State.RCPT): replies.NESTED_MAIL,
    ("MAIL", State.CHUNKING): replies.NESTED_MAIL,
    ("RCPT", State.CONNECTED): replies.NEED_HELO,
    ("RCPT", State.GREETED): replies.NEED_MAIL_BEFORE_RCPT,
    ("DATA", State.CONNECTED): replies.NEED_HELO,
    ("DATA", State.GREETED): replies.NEED_MAIL_BEFORE_DATA,
    ("DATA", State.MAIL): replies.NO_VALID_RECIPIENTS,  # RFC 5321 3.3
    ("DATA", State.CHUNKING): replies.DATA_AFTER_BDAT,  # RFC 3030 2
    ("BDAT", State.CONNECTED): replies.NEED_HELO,
    ("BDAT", State.GREETED): replies.NEED_MAIL_BEFORE_DATA,
    ("BDAT", State.MAIL): replies.NO_VALID_RECIPIENTS,
}
# Verbs whose argument is checked before their place in the sequence: DATA (a DATA with arguments is a syntax
# error wherever it comes) and BDAT (its size says how many octets to skip, even when it is refused).
_SYNTAX_FIRST = frozenset({"DATA", "BDAT"})


@dataclass
class _Transaction:
    """One mail transaction (RFC 5321 3.3), from an accepted MAIL to the end of DATA or RSET."""

    sender: Address | None
    smtputf8: bool
    body_8bitmime: bool
    recipients: list[Address]
    # The BDAT chunks received so far (RFC 3030); None while no BDAT was sent in this transaction.
    chunks: ChunkReader | None = None


@dataclass
class _BdatCommand:
    """The BDAT command whose chunk is being read: what to answer once its octets are consumed."""

    size: int
    last: bool
    reader: ChunkReader
    refusal: Reply | None  # the command was refused: discard the chunk, then send this
    resume: State  # the command state to go back to when the chunk does not end the transaction


# The states as module constants: an enum member looked up on its class (State.DATA) costs ~0.35 us on
# Python 3.11 (EnumType's __getattr__ slows every class attribute), and a session asks several per command.
_AUTH_LINE = State.AUTH_LINE
_BDAT = State.BDAT
_CHUNKING = State.CHUNKING
_CLOSED = State.CLOSED
_CONNECTED = State.CONNECTED
_DATA = State.DATA
_GREETED = State.GREETED
_MAIL = State.MAIL
_RCPT = State.RCPT
_TLS_HANDSHAKE = State.TLS_HANDSHAKE


class ServerConnection(ByteMachine[Event, DecisionEvent]):
    """One SMTP session, server side. See the module docstring for the calling protocol."""

    def __init__(self, settings: ServerSettings, observer: SessionObserver | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.observer = observer
        self.helo_name: str | None = None
        # True after EHLO (not HELO): the Received header says "with ESMTP" (RFC 3848).
        self.esmtp = False
        self._state = _CONNECTED
        # The command state an AUTH exchange (AUTH_LINE) returns to.
        self._resume = _CONNECTED
        self._transaction: _Transaction | None = None
        self._errors = 0
        self._framer = CommandFramer(settings.max_command_line)
        self._data_reader: DataReader | None = None
        self._bdat: _BdatCommand | None = None
        # The extension verb whose exchange continues after a 334 reply.
        self._continuation_verb = ""
        # The command table (verb -> unbound handler) is the class's, made once: BDAT only with CHUNKING.
        self._handlers = _HANDLERS_WITH_BDAT if settings.chunking else _HANDLERS

    # --- glue-facing API ---

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        """True once the session must end: flush data_to_send(), then close the connection."""
        return self._state is _CLOSED

    @property
    def in_transaction(self) -> bool:
        """True between an accepted MAIL and the end of DATA or RSET (RFC 4954 4: no AUTH then)."""
        return self._transaction is not None

    @property
    def current_timeout_kind(self) -> str:
        """Which timeout runs now: "data" while reading message content (RFC 5321 4.5.3.2.5), else "command"."""
        return "data" if self._state in (_DATA, _BDAT) else "command"

    def start(self) -> None:
        self._send(_greeting(self.settings.hostname))

    def next_event(self) -> Event | type[NeedData] | type[Paused]:
        """As ByteMachine.next_event, with `_paused()` and `closed` written out (this runs several times per
        command)."""
        events = self._events
        while True:
            if events:
                return events.popleft()
            state = self._state
            if self._pending is not None or state is _TLS_HANDSHAKE:
                return Paused
            if state is _CLOSED or not self._step():
                return NeedData

    def _paused(self) -> bool:
        return self._pending is not None or self._state is _TLS_HANDSHAKE

    def respond(self, reply: Reply) -> None:
        """Answer the pending decision event. After the session closed (e.g. timed out) this does nothing."""
        event = self._pending
        if event is None:
            if self.closed:
                return
            raise ProtocolUsageError("respond() called with no decision pending")
        self._pending = None
        accepted = 200 <= reply.code < 300
        if isinstance(event, MailRequested):
            if accepted:
                self._transaction = _Transaction(
                    sender=event.sender,
                    smtputf8="SMTPUTF8" in event.params,
                    body_8bitmime=(event.params.get("BODY") or "").upper() == "8BITMIME",
                    recipients=[],
                )
                self._state = _MAIL
            self._send_result(reply, client_error=reply.code >= 400)
        elif isinstance(event, RcptRequested):
            if accepted and self._transaction is not None:
                self._transaction.recipients.append(event.recipient)
                if self._state is _MAIL:
                    self._state = _RCPT
            self._send_result(reply, client_error=reply.code >= 400)
        elif isinstance(event, ExtensionCommand | ExtensionLine):
            self._respond_extension(event.verb, reply)
        else:
            # End of DATA: accepted or not, the transaction is over (RFC 5321 4.1.1.4).
            self._end_transaction()
            self._send(reply)

    def starttls_completed(self) -> None:
        """The glue finished the TLS handshake after its 2xx to STARTTLS: start over (RFC 3207 4.2).

        The server forgets everything learnt from the client before TLS: the EHLO name and any transaction.
        """
        if self._state is not _TLS_HANDSHAKE:
            raise ProtocolUsageError("starttls_completed() without an accepted STARTTLS")
        self.helo_name = None
        self.esmtp = False
        self._transaction = None
        self._state = _CONNECTED

    def timed_out(self) -> None:
        """The glue's timer for `current_timeout_kind` expired (RFC 5321 4.5.3.2): 421 4.4.2 and close."""
        if self.closed:
            return
        self._send(replies.TIMEOUT)
        self._end("timeout")

    # --- internals ---

    def _end_transaction(self) -> None:
        """RFC 5321 4.1.1.5: back to the state after EHLO/HELO, with no transaction."""
        self._transaction = None
        self._state = _GREETED if self.helo_name is not None else _CONNECTED

    def _respond_extension(self, verb: str, reply: Reply) -> None:
        resume = self._resume if self._state is _AUTH_LINE else self._state
        self._framer.max_line = self.settings.max_command_line
        if reply.code == 334:
            # RFC 4954 4: the next line is a response to the challenge, not a command.
            self._continuation_verb = verb
            self._resume = resume
            self._state = _AUTH_LINE
            self._framer.max_line = max(self.settings.max_command_line, self.settings.max_continuation_line)
            self._send(reply)
            return
        self._state = resume
        if verb == "STARTTLS" and 200 <= reply.code < 300:
            # RFC 3207 4.2 / CVE-2011-0411: what the client sent before the handshake is not executed after it.
            self._discard_plaintext_before_tls()
            self._state = _TLS_HANDSHAKE
        self._send_result(reply, client_error=reply.code >= 400)

    def _send(self, reply: Reply) -> None:
        if reply.code == 334 and not reply.text:
            # RFC 4954 4: continue-req = "334" SP [base64] CRLF; the space stays even with no challenge.
            self._output += b"334 \r\n"
        else:
            self._output += reply.to_bytes()
        if self.observer is not None:
            self.observer.reply(reply)

    def _send_result(self, reply: Reply, *, client_error: bool) -> None:
        """Send a reply; count it against max_errors when the client caused it."""
        self._send(reply)
        if client_error:
            self._errors += 1
            if self._errors >= self.settings.max_errors and not self.closed:
                self._send(replies.TOO_MANY_ERRORS)
                self._end("too many errors")

    def _error(self, reply: Reply) -> None:
        self._send_result(reply, client_error=True)

    def _end(self, reason: str) -> None:
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self._pending = None
        self._input.clear()
        self._data_reader = None
        self._bdat = None
        self._transaction = None
        self._events.append(SessionEnded(reason))

    def _step(self) -> bool:
        """Process input until an event is queued or a decision is pending; False when more data is needed."""
        if self._state is _DATA:
            return self._step_data()
        if self._state is _BDAT:
            return self._step_bdat()
        item = self._framer.next_line(self._input)
        if item is None:
            if self._eof:
                self._end("client closed the connection")
                return True
            return False
        if self._state is _AUTH_LINE:
            self._framer.max_line = self.settings.max_command_line
            self._decide(ExtensionLine(self._continuation_verb, item if isinstance(item, bytes) else None))
        elif item is OVERLONG:
            self._error(replies.COMMAND_TOO_LONG)
        elif isinstance(item, bytes):
            self._handle_command_line(item)
        return True

    def _step_data(self) -> bool:
        assert self._data_reader is not None
        result = self._data_reader.feed(self._input)
        if result is None:
            if self._eof:
                # A partial message is never emitted (RFC 5321 4.1.1.4: no ".", no transaction).
                self._end("client closed the connection during DATA")
                return True
            return False
        self._data_reader = None
        self._state = _RCPT
        self._finish_data(result)
        return True

    def _step_bdat(self) -> bool:
        command = self._bdat
        assert command is not None
        if not command.reader.feed(self._input):
            if self._eof:
                self._end("client closed the connection during BDAT")
                return True
            return False
        self._bdat = None
        self._state = command.resume
        if command.refusal is not None:
            self._error(command.refusal)
        elif command.reader.refused:
            # RFC 3030 2: after a failed chunk the transaction is over; later chunks get 503 and are discarded.
            self._finish_data(command.reader.result(final=command.last))
        elif command.last:
            self._finish_data(command.reader.result())
        else:
            self._state = _CHUNKING
            self._send(replies.chunk_received(command.size))
        return True

    def _finish_data(self, result: DataResult) -> None:
        transaction = self._transaction
        assert transaction is not None
        refusal: Reply | None = None
        if result.bare_line_ending:
            refusal = replies.BARE_LINE_ENDING_IN_DATA
        elif result.too_big:
            refusal = replies.MESSAGE_TOO_BIG
        elif result.line_too_long:
            refusal = replies.TEXT_LINE_TOO_LONG
        if refusal is not None or result.data is None:
            self._end_transaction()
            self._refuse_message(refusal or replies.BARE_LINE_ENDING_IN_DATA, len(transaction.recipients))
            return
        self._decide(
            MessageReceived(
                sender=transaction.sender,
                recipients=tuple(transaction.recipients),
                data=result.data,
                body_8bit=transaction.body_8bitmime or result.has_8bit,
                smtputf8=transaction.smtputf8,
            )
        )

    def _refuse_message(self, reply: Reply, recipients: int) -> None:
        """The machine itself refuses the message at its end: one reply (LMTP answers once per recipient)."""
        self._error(reply)

    def _decide(self, event: DecisionEvent) -> None:
        self._pending = event
        self._events.append(event)

    def _out_of_sequence(self, verb: str) -> Reply | None:
        """The state table's refusal of `verb` in the current state, or None when it is accepted here."""
        return _OUT_OF_SEQUENCE.get((verb, self._state))

    def _handle_command_line(self, raw: bytes) -> None:
        if CommandFramer.has_forbidden_octets(raw):
            self._error(replies.BARE_LINE_ENDING_IN_COMMAND)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(replies.COMMAND_NOT_UTF8)
            return
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if verb in self.settings.extension_commands:
            self._observe_command(verb)
            self._decide(ExtensionCommand(verb, argument))
            return
        handler = self._handlers.get(verb)
        self._observe_command(verb if handler is not None else "other")
        if handler is None:
            self._error(replies.UNKNOWN_COMMAND)
            return
        refusal = None if verb in _SYNTAX_FIRST else self._out_of_sequence(verb)
        if refusal is not None:
            self._error(refusal)
            return
        handler(self, argument)

    def _observe_command(self, verb: str) -> None:
        if self.observer is not None:
            self.observer.command(verb)

    # --- commands (RFC 5321 4.1.1); each runs only where the state table accepts it ---

    def _greeting_name(self, argument: str) -> str | None:
        name = argument.strip(" ")
        return name if name and " " not in name else None

    def _ehlo(self, argument: str) -> None:
        name = self._greeting_name(argument)
        if name is None:
            self._error(replies.HELO_SYNTAX)
            return
        self.helo_name = name
        self.esmtp = True
        self._end_transaction()  # RFC 5321 4.1.4: EHLO implies RSET
        self._send(_ehlo_reply(self.settings.hostname, name, self.settings))

    def _helo(self, argument: str) -> None:
        name = self._greeting_name(argument)
        if name is None:
            self._error(replies.HELO_SYNTAX)
            return
        self.helo_name = name
        self.esmtp = False
        self._end_transaction()
        self._send(_helo_reply(self.settings.hostname, name))

    def _mail(self, argument: str) -> None:
        if argument[:5].upper() != "FROM:":
            self._error(replies.MAIL_SYNTAX)
            return
        path_text, params_text = split_path_and_parameters(argument[5:])
        try:
            params = parse_mail_parameters(params_text)
            size = self._check_mail_parameters(params)
            sender = parse_reverse_path(path_text, smtputf8="SMTPUTF8" in params)
        except SmtpSyntaxError as problem:
            self._error(problem.reply)
            return
        self._decide(MailRequested(sender=sender, params=params, size=size))

    def _check_mail_parameters(self, params: dict[str, str | None]) -> int | None:
        unknown = set(params) - _MAIL_PARAMETERS - self.settings.extra_mail_parameters
        if unknown:
            raise SmtpSyntaxError(replies.UNKNOWN_MAIL_PARAMETER)
        if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
            raise SmtpSyntaxError(replies.SMTPUTF8_SYNTAX)
        if "BODY" in params and (params["BODY"] or "").upper() not in ("7BIT", "8BITMIME"):
            raise SmtpSyntaxError(replies.BODY_SYNTAX)
        if "SIZE" not in params:
            return None
        text = params["SIZE"] or ""
        if not (text.isascii() and text.isdigit()) or len(text) > 20:
            raise SmtpSyntaxError(replies.SIZE_SYNTAX)
        size = int(text)
        if size > self.settings.max_message_size:
            raise SmtpSyntaxError(replies.MESSAGE_SIZE_EXCEEDS_LIMIT)  # RFC 1870 6.1
        return size

    def _rcpt(self, argument: str) -> None:
        transaction = self._transaction
        assert transaction is not None  # the state table accepts RCPT only in a transaction
        if argument[:3].upper() != "TO:":
            self._error(replies.RCPT_SYNTAX)
            return
        # The everyday "<local@domain>" and nothing after it: the Address the split and the parser would make.
        plain = plain_path(argument[3:].strip(" "))
        if plain is not None:
            recipient: Address = plain
            params: dict[str, str | None] = {}
        else:
            path_text, params_text = split_path_and_parameters(argument[3:])
            try:
                params = parse_mail_parameters(params_text) if params_text else {}
                if params and set(params) - _RCPT_PARAMETERS - self.settings.extra_rcpt_parameters:
                    raise SmtpSyntaxError(replies.UNKNOWN_RCPT_PARAMETER)
                recipient = parse_forward_path(path_text, smtputf8=transaction.smtputf8)
            except SmtpSyntaxError as problem:
                self._error(problem.reply)
                return
        if not recipient.domain:
            # RFC 5321 4.1.1.3: <Postmaster> without a domain means the postmaster of this server.
            recipient = Address(recipient.local_part, self.settings.hostname)
        if len(transaction.recipients) >= self.settings.max_recipients:
            # RFC 5321 4.5.3.1.10: a temporary refusal; the client sends the rest in another transaction.
            self._send(replies.TOO_MANY_RECIPIENTS)
            return
        self._decide(RcptRequested(recipient=recipient, params=params))

    def _data(self, argument: str) -> None:
        if argument.strip(" "):
            self._error(replies.NO_ARGUMENTS_ALLOWED)
            return
        refusal = self._out_of_sequence("DATA")
        if refusal is not None:
            self._error(refusal)
            return
        self._send(replies.START_DATA)
        self._state = _DATA
        self._data_reader = DataReader(self.settings.max_text_line, self.settings.max_message_size)

    def _bdat_command(self, argument: str) -> None:
        """RFC 3030 2: "BDAT size [LAST]"; the chunk's octets follow the CRLF whatever the reply will be."""
        words = argument.split(" ")
        size_text = words[0] if words else ""
        if not (size_text.isascii() and size_text.isdigit()) or len(size_text) > 20 or len(words) > 2:
            self._error(replies.BDAT_SYNTAX)  # without a size nothing can be skipped: read on as commands
            return
        if len(words) == 2 and words[1].upper() != "LAST":
            self._error(replies.BDAT_SYNTAX)
            return
        size = int(size_text)
        refusal = self._out_of_sequence("BDAT")
        transaction = self._transaction
        if transaction is not None and refusal is None:
            if transaction.chunks is None:
                transaction.chunks = ChunkReader(self.settings.max_text_line, self.settings.max_message_size)
            reader = transaction.chunks
        else:
            reader = ChunkReader(self.settings.max_text_line, self.settings.max_message_size)
        reader.start_chunk(size, keep=refusal is None)
        self._bdat = _BdatCommand(size=size, last=len(words) == 2, reader=reader, refusal=refusal,
                                  resume=self._state)
        self._state = _BDAT

    def _rset(self, argument: str) -> None:
        if argument.strip(" "):
            self._error(replies.NO_ARGUMENTS_ALLOWED)
            return
        self._end_transaction()
        self._send(replies.RESET_OK)

    def _noop(self, argument: str) -> None:
        # RFC 5321 4.1.1.9: NOOP may carry a string argument, which is ignored.
        self._send(replies.OK)

    def _quit(self, argument: str) -> None:
        if argument.strip(" "):
            self._error(replies.NO_ARGUMENTS_ALLOWED)
            return
        self._send(replies.BYE)
        self._end("quit")

    def _help(self, argument: str) -> None:
        self._send(replies.HELP)

    def _vrfy(self, argument: str) -> None:
        if not argument.strip(" "):
            self._error(replies.VRFY_SYNTAX)
            return
        self._send(replies.CANNOT_VRFY)

    def _expn(self, argument: str) -> None:
        self._error(replies.EXPN_NOT_AVAILABLE)


_HANDLERS: dict[str, _Handler] = {
    "EHLO": ServerConnection._ehlo,
    "HELO": ServerConnection._helo,
    "MAIL": ServerConnection._mail,
    "RCPT": ServerConnection._rcpt,
    "DATA": ServerConnection._data,
    "RSET": ServerConnection._rset,
    "NOOP": ServerConnection._noop,
    "QUIT": ServerConnection._quit,
    "HELP": ServerConnection._help,
    "VRFY": ServerConnection._vrfy,
    "EXPN": ServerConnection._expn,
}
_HANDLERS_WITH_BDAT: dict[str, _Handler] = {**_HANDLERS, "BDAT": ServerConnection._bdat_command}
