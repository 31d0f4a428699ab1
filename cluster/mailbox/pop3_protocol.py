"""Sans-I/O POP3 server state machine (RFC 1939, with RFC 2449 CAPA / response codes and RFC 2595 STLS).

The glue owns the socket and calls: `start()` once (queues the greeting), `receive_data(bytes)` with what
arrived (b"" on EOF), `next_event()` until it returns `NeedData`, the answer method for each decision event,
and sends `data_to_send()` to the client. When `closed` becomes True it flushes `data_to_send()` and closes.

States (RFC 1939 3): AUTHORIZATION (USER, PASS, CAPA, STLS, QUIT), TRANSACTION (STAT, LIST, RETR, DELE, NOOP,
RSET, UIDL, TOP, CAPA, QUIT), UPDATE (entered only by QUIT in TRANSACTION: the deletions are applied then,
and only then; a connection that drops or times out deletes nothing).

Decision events pause the machine (`next_event()` returns `Paused`, new input is only buffered) until the glue
answers with the matching method:
- `CredentialsReceived` -> `credentials_checked(CredentialCheck)` (check the users file);
- `MaildropRequested` -> `maildrop_opened([MessageInfo...])` or `maildrop_unavailable(in_use=...)`
  (take the user's exclusive maildrop lock, list the messages), or `maildrop_proxied()` when another node
  owns the maildrop and the glue hands the session over to it;
- `MessageRequested` -> `message_loaded(content or None)` (RETR and TOP: read one message);
- `UpdateRequested` -> `update_done(not_removed)` (QUIT: remove the messages marked deleted);
- `StartTlsRequested` -> `tls_established()` after the glue sent "+OK" and finished the TLS handshake.
Calling an answer method with no (or another) decision pending raises `ProtocolUsageError`.

Framing: only CRLF ends a line; a command line holds at most `max_line` octets with its CRLF (RFC 2449 4: 255).
Messages are sent with CRLF line ends (`normalize_message`), lines starting with "." byte-stuffed, ended by
".CRLF" (RFC 1939 3). Sizes (STAT, LIST, "+OK n octets") count the normalized message before stuffing.

Plaintext USER/PASS is refused with "-ERR [AUTH] Encryption required" (RFC 2595 2.1, RFC 3206 4) unless the
connection is under TLS or the glue said plaintext is allowed on this connection (`plaintext_auth_allowed`).

Failure modes: every malformed or out-of-place command gets "-ERR"; after `max_errors` of them, or after
`max_auth_failures` failed logins, the session ends with a final "-ERR" and `SessionEnded`. Nothing here
raises on any client input. Passwords appear only in `CredentialsReceived` (left out of its repr).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from cluster.sansio import ByteMachine
from cluster.sansio import NeedData as NeedData
from cluster.sansio import Paused as Paused
from cluster.sansio import ProtocolUsageError as ProtocolUsageError
from cluster.sansio import SessionEnded as SessionEnded
from cluster.smtp.lines import OVERLONG, CommandFramer

CRLF = b"\r\n"
# RFC 2449 4: "Keywords and arguments ... command lines [are] up to 255 octets, including the terminating CRLF".
MAX_COMMAND_LINE = 255
_LINE_END = re.compile(rb"\r\n|\r|\n")


class CredentialCheck(Enum):
    OK = "ok"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"  # the users file cannot be read: a temporary failure, not the client's fault


@dataclass(frozen=True)
class MessageInfo:
    """One message of an opened maildrop: its unique id (UIDL, RFC 1939 7) and size in octets as sent."""

    uid: str
    size: int


@dataclass(frozen=True)
class CredentialsReceived:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MaildropRequested:
    """The password was right: lock and open the maildrop of `username` (RFC 1939 4, end of AUTHORIZATION)."""

    username: str


@dataclass(frozen=True)
class MessageRequested:
    """RETR (`top_lines` None) or TOP of message `number` (1-based): the glue reads it, calls `message_loaded`."""

    number: int
    uid: str
    top_lines: int | None = None


@dataclass(frozen=True)
class UpdateRequested:
    """QUIT in TRANSACTION (RFC 1939 6): remove these messages, then answer `update_done`."""

    uids: tuple[str, ...]


@dataclass(frozen=True)
class StartTlsRequested:
    """STLS was accepted and "+OK" queued: flush it, do the TLS handshake, then call `tls_established`."""


DecisionEvent = CredentialsReceived | MaildropRequested | MessageRequested | UpdateRequested | StartTlsRequested
_Decision = TypeVar("_Decision", CredentialsReceived, MaildropRequested, MessageRequested, UpdateRequested,
                    StartTlsRequested)
Event = DecisionEvent | SessionEnded


@dataclass(frozen=True)
class Pop3Settings:
    hostname: str = "localhost"
    max_line: int = MAX_COMMAND_LINE
    max_errors: int = 10  # -ERR answers to client mistakes before the session is closed
    max_auth_failures: int = 3  # failed PASS before the session is closed
    tls_available: bool = False  # the glue can do STLS (a certificate is configured)


class _State(Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


_AUTH = frozenset({_State.AUTHORIZATION})
_TRANS = frozenset({_State.TRANSACTION})

# Replies (RFC 2449 8 / RFC 3206 response codes in brackets).
ENCRYPTION_REQUIRED = b"-ERR [AUTH] Encryption required: use STLS first"
INVALID_LOGIN = b"-ERR [AUTH] Invalid user name or password"
TOO_MANY_AUTH_FAILURES = b"-ERR [AUTH] Too many failed logins, closing connection"
AUTH_UNAVAILABLE = b"-ERR [SYS/TEMP] Authentication temporarily unavailable, try again later"
IN_USE = b"-ERR [IN-USE] Maildrop is locked by another session"
MAILDROP_UNAVAILABLE = b"-ERR [SYS/TEMP] Maildrop temporarily unavailable, try again later"
UNKNOWN_COMMAND = b"-ERR Unknown command"
WRONG_STATE = b"-ERR Command not valid in this state"
LINE_TOO_LONG = b"-ERR Command line too long"
BAD_CHARACTERS = b"-ERR Invalid characters in command line"
SYNTAX = b"-ERR Syntax error in arguments"
NO_SUCH_MESSAGE = b"-ERR No such message"
ALREADY_DELETED = b"-ERR Message already deleted"
MESSAGE_GONE = b"-ERR [SYS/TEMP] Message cannot be read now"
USER_FIRST = b"-ERR Send USER first"
TLS_ACTIVE = b"-ERR TLS already active"
TLS_UNAVAILABLE = b"-ERR STLS not available"
TOO_MANY_ERRORS = b"-ERR Too many errors, closing connection"
TIMEOUT = b"-ERR Idle for too long, closing connection"
NOT_REMOVED = b"-ERR [SYS/TEMP] Some deleted messages not removed"


def normalize_message(raw: bytes) -> bytes:
    """The message as POP3 sends it: every line end CRLF, and a final CRLF after a last unterminated line."""
    text = _LINE_END.sub(CRLF, raw)
    if text and not text.endswith(CRLF):
        text += CRLF
    return text


def top_of_message(message: bytes, body_lines: int) -> bytes:
    """RFC 1939 7 TOP: the header, the blank line after it, and the first `body_lines` lines of the body."""
    lines = message.splitlines(keepends=True)
    try:
        blank = lines.index(CRLF)
    except ValueError:
        return message  # no body at all: the whole message is header
    return b"".join(lines[: blank + 1 + body_lines])


def dot_stuff(message: bytes) -> bytes:
    """RFC 1939 3: a line starting with "." gets one more "." in front (the message is CRLF-normalized)."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def parse_number(text: str) -> int | None:
    """A decimal message number or line count ("0" allowed here; the caller checks the range)."""
    if not text or len(text) > 9 or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


class Pop3Connection(ByteMachine[Event, DecisionEvent]):
    """One POP3 session, server side. See the module docstring for the calling protocol."""

    def __init__(self, settings: Pop3Settings, *, plaintext_auth_allowed: bool) -> None:
        super().__init__()
        self.settings = settings
        self.plaintext_auth_allowed = plaintext_auth_allowed
        self.tls_active = False
        self.username: str | None = None  # the logged-in user, once in TRANSACTION
        self._state = _State.AUTHORIZATION
        self._framer = CommandFramer(settings.max_line)
        self._errors = 0
        self._auth_failures = 0
        self._user_given: str | None = None  # USER name waiting for PASS
        self._messages: list[MessageInfo] = []
        self._deleted: set[int] = set()  # 0-based indexes marked by DELE
        self._ended = False
        self._handlers: dict[str, tuple[frozenset[_State], Callable[[list[str], str], None]]] = {
            "USER": (_AUTH, self._user),
            "PASS": (_AUTH, self._pass),
            "STLS": (_AUTH, self._stls),
            "CAPA": (_AUTH | _TRANS, self._capa),
            "QUIT": (_AUTH | _TRANS, self._quit),
            "STAT": (_TRANS, self._stat),
            "LIST": (_TRANS, self._list),
            "UIDL": (_TRANS, self._uidl),
            "RETR": (_TRANS, self._retr),
            "TOP": (_TRANS, self._top),
            "DELE": (_TRANS, self._dele),
            "NOOP": (_TRANS, self._noop),
            "RSET": (_TRANS, self._rset),
        }

    # --- glue-facing API ---

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def marked_for_deletion(self) -> tuple[str, ...]:
        return tuple(self._messages[i].uid for i in sorted(self._deleted))

    def start(self) -> None:
        self._send(b"+OK " + self.settings.hostname.encode("ascii", "replace") + b" POP3 server ready")

    def timed_out(self) -> None:
        """RFC 1939 3: the autologout timer expired: close without entering UPDATE (nothing is deleted)."""
        if not self.closed:
            self._send(TIMEOUT)
            self._end("timeout")

    def credentials_checked(self, result: CredentialCheck) -> None:
        event = self._take(CredentialsReceived)
        if result is CredentialCheck.OK:
            self._decide(MaildropRequested(event.username))
        elif result is CredentialCheck.UNAVAILABLE:
            self._send(AUTH_UNAVAILABLE)
        else:
            self._auth_failures += 1
            if self._auth_failures >= self.settings.max_auth_failures:
                self._send(TOO_MANY_AUTH_FAILURES)
                self._end("too many failed logins")
            else:
                self._send(INVALID_LOGIN)

    def maildrop_opened(self, messages: Sequence[MessageInfo]) -> None:
        event = self._take(MaildropRequested)
        self.username = event.username
        self._messages = list(messages)
        self._deleted.clear()
        self._state = _State.TRANSACTION
        count, octets = self._totals()
        self._send(f"+OK Maildrop locked and ready, {count} messages ({octets} octets)".encode())

    def maildrop_proxied(self) -> bytes:
        """The maildrop lives on another node, which now serves this session (a proxy, as Dovecot's): the
        machine stops here. Returns the client's input that arrived after PASS and was not yet processed
        (pipelined commands), for the glue to pass on to that node; the glue sends the node's "+OK"."""
        event = self._take(MaildropRequested)
        self.username = event.username
        leftover = bytes(self._input)
        self._input.clear()
        self._state = _State.CLOSED
        self._ended = True
        return leftover

    def maildrop_unavailable(self, *, in_use: bool) -> None:
        """RFC 1939 4: the lock could not be had; stay in AUTHORIZATION (the client may retry or QUIT)."""
        self._take(MaildropRequested)
        self._send(IN_USE if in_use else MAILDROP_UNAVAILABLE)

    def message_loaded(self, content: bytes | None) -> None:
        """The message of the pending RETR/TOP (raw file content), or None when it cannot be read."""
        top_lines = self._take(MessageRequested).top_lines
        if content is None:
            self._send(MESSAGE_GONE)
            return
        message = normalize_message(content)
        if top_lines is None:
            self._send(f"+OK {len(message)} octets".encode())
        else:
            message = top_of_message(message, top_lines)
            self._send(b"+OK Top of message follows")
        self._output += dot_stuff(message) + b".\r\n"

    def update_done(self, not_removed: int) -> None:
        """RFC 1939 6: the UPDATE state is over; answer QUIT and close."""
        self._take(UpdateRequested)
        if not_removed:
            self._send(NOT_REMOVED)
        else:
            left = len(self._messages) - len(self._deleted)
            self._send(f"+OK Bye ({left} messages left)".encode())
        self._end("quit")

    def tls_established(self) -> None:
        """RFC 2595 4: TLS is up; the session stays in AUTHORIZATION and forgets any USER name."""
        self._take(StartTlsRequested)
        self.tls_active = True
        self._user_given = None

    # --- internals ---

    def _take(self, kind: type[_Decision]) -> _Decision:
        event = self._pending
        if not isinstance(event, kind):
            raise ProtocolUsageError(f"no {kind.__name__} pending (pending: {event!r})")
        self._pending = None
        return event

    def _decide(self, event: DecisionEvent) -> None:
        self._pending = event
        self._events.append(event)

    def _send(self, line: bytes) -> None:
        self._output += line + CRLF

    def _error(self, line: bytes) -> None:
        """A "-ERR" caused by the client: counted against max_errors."""
        self._send(line)
        self._errors += 1
        if self._errors >= self.settings.max_errors and not self.closed:
            self._send(TOO_MANY_ERRORS)
            self._end("too many errors")

    def _end(self, reason: str) -> None:
        self._state = _State.CLOSED
        self._pending = None
        self._input.clear()
        if not self._ended:
            self._ended = True
            self._events.append(SessionEnded(reason))

    def _totals(self) -> tuple[int, int]:
        kept = [m for i, m in enumerate(self._messages) if i not in self._deleted]
        return len(kept), sum(m.size for m in kept)

    def _step(self) -> bool:
        item = self._framer.next_line(self._input)
        if item is None:
            if self._eof:
                self._end("client closed the connection")
                return True
            return False
        if item is OVERLONG:
            self._error(LINE_TOO_LONG)
        elif isinstance(item, bytes):
            self._handle_line(item)
        return True

    def _handle_line(self, raw: bytes) -> None:
        if CommandFramer.has_forbidden_octets(raw):
            self._error(BAD_CHARACTERS)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(BAD_CHARACTERS)
            return
        verb, _, rest = line.partition(" ")
        handler = self._handlers.get(verb.upper())
        if handler is None:
            self._error(UNKNOWN_COMMAND)
            return
        states, method = handler
        if self._state not in states:
            self._error(WRONG_STATE)
            return
        method(rest.split(" ") if rest else [], rest)

    def _message_index(self, text: str) -> int | None:
        """0-based index of a live message from its number, or None after sending the right -ERR."""
        number = parse_number(text)
        if number is None:
            self._error(SYNTAX)
            return None
        if not 1 <= number <= len(self._messages):
            self._error(NO_SUCH_MESSAGE)
            return None
        if number - 1 in self._deleted:
            self._error(ALREADY_DELETED)
            return None
        return number - 1

    # --- AUTHORIZATION (RFC 1939 4 and 7, RFC 2449 5, RFC 2595 4) ---

    def _plaintext_refused(self) -> bool:
        if self.tls_active or self.plaintext_auth_allowed:
            return False
        self._error(ENCRYPTION_REQUIRED)
        return True

    def _user(self, args: list[str], rest: str) -> None:
        if self._plaintext_refused():
            return
        if len(args) != 1 or not args[0]:
            self._error(SYNTAX)
            return
        # The answer is the same for every name: no probing for which users exist.
        self._user_given = args[0]
        self._send(b"+OK Send your password")

    def _pass(self, args: list[str], rest: str) -> None:
        if self._plaintext_refused():
            return
        username, self._user_given = self._user_given, None
        if username is None:
            self._error(USER_FIRST)
            return
        # RFC 1939 7: the password may contain spaces; it is everything after "PASS ".
        self._decide(CredentialsReceived(username, rest))

    def _stls(self, args: list[str], rest: str) -> None:
        if args:
            self._error(SYNTAX)
        elif self.tls_active:
            self._error(TLS_ACTIVE)
        elif not self.settings.tls_available:
            self._error(TLS_UNAVAILABLE)
        else:
            self._send(b"+OK Begin TLS negotiation")
            self._discard_plaintext_before_tls()
            self._decide(StartTlsRequested())

    def _capa(self, args: list[str], rest: str) -> None:
        capabilities = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._state is _State.AUTHORIZATION:
            if self.tls_active or self.plaintext_auth_allowed:
                capabilities.append("USER")  # RFC 2595 4: not offered where it would be refused
            if self.settings.tls_available and not self.tls_active:
                capabilities.append("STLS")
        capabilities.append("IMPLEMENTATION mtacluster")
        self._send(b"+OK Capability list follows")
        self._output += b"".join(c.encode() + CRLF for c in capabilities) + b".\r\n"

    def _quit(self, args: list[str], rest: str) -> None:
        if self._state is _State.TRANSACTION and self._deleted:
            self._state = _State.UPDATE
            self._decide(UpdateRequested(self.marked_for_deletion))
            return
        if self._state is _State.TRANSACTION:
            self._send(f"+OK Bye ({len(self._messages)} messages left)".encode())
        else:
            self._send(b"+OK Bye")
        self._end("quit")

    # --- TRANSACTION (RFC 1939 5 and 7) ---

    def _stat(self, args: list[str], rest: str) -> None:
        if args:
            self._error(SYNTAX)
            return
        count, octets = self._totals()
        self._send(f"+OK {count} {octets}".encode())

    def _scan_listing(self, args: list[str], value: Callable[[MessageInfo], str]) -> None:
        """LIST and UIDL: one message ("+OK n value") or all live ones (multi-line)."""
        if len(args) > 1:
            self._error(SYNTAX)
            return
        if args:
            index = self._message_index(args[0])
            if index is not None:
                self._send(f"+OK {index + 1} {value(self._messages[index])}".encode())
            return
        count, octets = self._totals()
        self._send(f"+OK {count} messages ({octets} octets)".encode())
        for index, message in enumerate(self._messages):
            if index not in self._deleted:
                self._output += f"{index + 1} {value(message)}".encode() + CRLF
        self._output += b".\r\n"

    def _list(self, args: list[str], rest: str) -> None:
        self._scan_listing(args, lambda m: str(m.size))

    def _uidl(self, args: list[str], rest: str) -> None:
        self._scan_listing(args, lambda m: m.uid)

    def _retr(self, args: list[str], rest: str) -> None:
        if len(args) != 1:
            self._error(SYNTAX)
            return
        index = self._message_index(args[0])
        if index is not None:
            self._decide(MessageRequested(index + 1, self._messages[index].uid))

    def _top(self, args: list[str], rest: str) -> None:
        if len(args) != 2:
            self._error(SYNTAX)
            return
        lines = parse_number(args[1])
        if lines is None:
            self._error(SYNTAX)
            return
        index = self._message_index(args[0])
        if index is not None:
            self._decide(MessageRequested(index + 1, self._messages[index].uid, lines))

    def _dele(self, args: list[str], rest: str) -> None:
        if len(args) != 1:
            self._error(SYNTAX)
            return
        index = self._message_index(args[0])
        if index is not None:
            self._deleted.add(index)  # RFC 1939 5: only marked; removed in the UPDATE state
            self._send(f"+OK Message {index + 1} deleted".encode())

    def _noop(self, args: list[str], rest: str) -> None:
        self._send(b"+OK")

    def _rset(self, args: list[str], rest: str) -> None:
        self._deleted.clear()
        count, octets = self._totals()
        self._send(f"+OK Maildrop has {count} messages ({octets} octets)".encode())
