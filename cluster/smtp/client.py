"""The client side of SMTP as a state machine without I/O: commands out as bytes, reply bytes in -> `Reply`.

`ClientConnection` is what a delivery session drives:

    conn = ClientConnection()                  # expects the greeting first
    conn.receive_data(bytes_from_socket)
    conn.next_reply() -> ("greeting", Reply)   # or None when more bytes are needed
    wire = conn.send(Command.ehlo("me.example"))
    wire = conn.send_message(body)             # after 354: dot-stuffed body + CRLF.CRLF; expects the final reply
    head, tail = conn.send_message_parts(body) # the same as two parts (no copy of a body that needs no stuffing)

Every `send` records which reply the client now waits for, so a pipelined group (RFC 2920) is answered in order
and `next_reply()` says which command each reply belongs to.

Replies are parsed as RFC 5321 section 4.2 says: "code SP text" ends a reply, "code-text" continues it, every
line of one reply has the same code; a lone "code" is accepted (4.2.1 makes the text optional). A line ending
is CRLF; a bare LF from a sloppy server is tolerated (we are the client: being strict here loses mail).
Anything else (no three-digit code, mixed codes, a line or reply that never ends within the limits, a reply
nobody asked for) raises `SmtpProtocolError` with a message that says what the server did wrong.

`Capabilities.from_ehlo(reply)` reads an EHLO reply (RFC 5321 4.1.1.1): the first line is the greeting, every
further line an extension keyword with parameters (SIZE, PIPELINING, 8BITMIME, STARTTLS, SMTPUTF8 ...).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from cluster.smtp.replies import Reply
from cluster.smtp.scan import find_dot_line

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets. Real servers exceed it now and then; be lenient
# up to this, and call anything longer broken.
MAX_REPLY_LINE = 4096
# A multi-line reply longer than this many lines is broken (EHLO replies have a few dozen at most).
MAX_REPLY_LINES = 200

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]?)(.*)$", re.DOTALL)

# RFC 2920 3.1: these commands may only be the last one of a pipelined group.
_GROUP_ENDERS = frozenset({"EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "TURN", "QUIT", "NOOP", "AUTH", "STARTTLS"})


class SmtpProtocolError(Exception):
    """The remote server broke the protocol (malformed or unexpected reply). The text says how."""


@dataclass(frozen=True, init=False)
class Command:
    """One SMTP command line. `verb` names the reply the client then waits for. (One RCPT per recipient: the
    constructor fills the dict at once instead of two frozen `object.__setattr__` calls.)"""

    verb: str
    line: bytes

    def __init__(self, verb: str, line: bytes) -> None:
        self.__dict__.update(verb=verb, line=line)

    @staticmethod
    def _build(verb: str, argument: str = "") -> Command:
        if "\r" in argument or "\n" in argument or "\0" in argument:
            # A CR or LF inside an argument would smuggle a second command onto the wire.
            raise ValueError(f"{verb} argument contains a line break or NUL: {argument!r}")
        text = f"{verb} {argument}" if argument else verb
        return Command(verb, text.encode("utf-8") + b"\r\n")

    @classmethod
    def ehlo(cls, name: str) -> Command:
        return cls._build("EHLO", name)

    @classmethod
    def lhlo(cls, name: str) -> Command:
        """RFC 2033 4.1: LMTP's EHLO."""
        return cls._build("LHLO", name)

    @classmethod
    def helo(cls, name: str) -> Command:
        return cls._build("HELO", name)

    @classmethod
    def mail(cls, sender: str, size: int | None = None, body_8bit: bool = False, smtputf8: bool = False) -> Command:
        """MAIL FROM:<sender> with RFC 1870 SIZE= and RFC 6152 BODY=8BITMIME / RFC 6531 SMTPUTF8 parameters."""
        params = ""
        if size is not None:
            params += f" SIZE={size}"
        if body_8bit:
            params += " BODY=8BITMIME"
        if smtputf8:
            params += " SMTPUTF8"
        return cls._build("MAIL", f"FROM:<{sender}>{params}")

    @classmethod
    def rcpt(cls, recipient: str) -> Command:
        if "\r" in recipient or "\n" in recipient or "\0" in recipient:
            return cls._build("RCPT", f"TO:<{recipient}>")  # refused there, in the same words
        return Command("RCPT", b"RCPT TO:<" + recipient.encode("utf-8") + b">\r\n")  # what _build would make

    @classmethod
    def data(cls) -> Command:
        return _DATA

    @classmethod
    def rset(cls) -> Command:
        return _RSET

    @classmethod
    def noop(cls) -> Command:
        return _NOOP

    @classmethod
    def quit(cls) -> Command:
        return _QUIT

    @classmethod
    def starttls(cls) -> Command:
        return _STARTTLS


# The commands without an argument, made once (a Command is immutable).
_DATA, _RSET, _NOOP, _QUIT, _STARTTLS = (Command._build(verb) for verb in ("DATA", "RSET", "NOOP", "QUIT", "STARTTLS"))


def pipeline_groups(commands: list[Command]) -> list[list[Command]]:
    """Split commands into the groups that may be sent together under RFC 2920 PIPELINING (3.1): a group
    ends after any command that changes the conversation (EHLO, DATA, STARTTLS, QUIT ...)."""
    groups: list[list[Command]] = []
    current: list[Command] = []
    for command in commands:
        current.append(command)
        if command.verb in _GROUP_ENDERS:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def dot_stuff(body: bytes) -> bytes:
    """The message as sent after 354 (RFC 5321 4.5.2): a "." doubled at the start of every line, the last
    line ended with CRLF, then the end-of-data line ".". The body itself is not otherwise changed."""
    if not body.startswith(b".") and body.endswith(b"\r\n") and find_dot_line(body) < 0:
        return body + b".\r\n"  # nothing to stuff (the usual case): one copy, no scan-and-replace
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def dot_stuffed_parts(body: bytes) -> tuple[bytes, bytes]:
    """`dot_stuff(body)` in two parts whose join it is: when nothing needs stuffing (the usual case), the body
    itself and the end-of-data line, so a big body is sent without a copy; otherwise the stuffed message and b""."""
    if not body.startswith(b".") and body.endswith(b"\r\n") and find_dot_line(body) < 0:
        return body, b".\r\n"
    return dot_stuff(body), b""


def has_8bit(body: bytes) -> bool:
    return not body.isascii()


@dataclass(frozen=True)
class Capabilities:
    """ESMTP extensions a server announced in its EHLO reply: keyword (upper case) -> parameters."""

    extensions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    esmtp: bool = True

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        extensions: dict[str, tuple[str, ...]] = {}
        for line in reply.lines[1:]:
            words = line.split()
            if words:
                extensions[words[0].upper()] = tuple(words[1:])
        return cls(extensions, esmtp=True)

    @classmethod
    def helo_only(cls) -> Capabilities:
        return cls({}, esmtp=False)

    def offers(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def pipelining(self) -> bool:
        return self.offers("PIPELINING")

    @property
    def starttls(self) -> bool:
        return self.offers("STARTTLS")

    @property
    def eight_bit_mime(self) -> bool:
        return self.offers("8BITMIME")

    @property
    def smtputf8(self) -> bool:
        return self.offers("SMTPUTF8")

    @property
    def size_limit(self) -> int | None:
        """RFC 1870: "SIZE n" is the largest message the server takes; 0 or no number means no fixed limit.
        None when SIZE is not offered at all."""
        params = self.extensions.get("SIZE")
        if params is None:
            return None
        if params and params[0].isdigit():
            limit = int(params[0])
            return limit if limit > 0 else 0
        return 0


# One-line reply lines already parsed (a `Reply` is immutable, so one instance serves every connection).
_ONE_LINE_REPLIES: dict[bytes, Reply] = {}
_ONE_LINE_REPLIES_KEPT = 1024
_ONE_LINE_REPLY_MAX = 200


class ReplyParser:
    """Bytes from the server in, whole `Reply` objects out (RFC 5321 4.2)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._code: bytes | None = None
        self._texts: list[str] = []
        self._ready: deque[Reply] = deque()

    def feed(self, data: bytes) -> None:
        if self._buffer:  # the rest of a line that began in an earlier read
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                if len(data) - start > MAX_REPLY_LINE:
                    raise SmtpProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets without a line end")
                self._buffer += data[start:]
                return
            line = data[start:end - 1] if end > start and data[end - 1] == 13 else data[start:end]  # 13: CR
            start = end + 1
            self._line(line)

    def _line(self, line: bytes) -> None:
        if self._code is None:
            # Most replies are one of a few one-line replies ("250 2.1.5 Ok"): parsed once per process.
            known = _ONE_LINE_REPLIES.get(line)
            if known is not None:
                self._ready.append(known)
                return
        if len(line) > MAX_REPLY_LINE:
            raise SmtpProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
        m = _REPLY_LINE.match(line)
        if m is None or (m.group(2) == b"" and m.group(3) != b""):
            raise SmtpProtocolError(f"malformed reply line (no 3-digit code): {_show(line)}")
        code, separator, text = m.group(1), m.group(2), m.group(3)
        if self._code is not None and code != self._code:
            raise SmtpProtocolError(
                f"reply line with code {code.decode()} inside a {self._code.decode()} reply: {_show(line)}")
        self._code = code
        self._texts.append(text.decode("utf-8", "replace"))
        if len(self._texts) > MAX_REPLY_LINES:
            raise SmtpProtocolError(f"reply with more than {MAX_REPLY_LINES} lines")
        if separator != b"-":
            reply = Reply.from_lines(int(code), self._texts)
            if len(self._texts) == 1 and len(line) <= _ONE_LINE_REPLY_MAX:
                if len(_ONE_LINE_REPLIES) >= _ONE_LINE_REPLIES_KEPT:
                    _ONE_LINE_REPLIES.clear()  # full of one-off texts (queue ids): start again, the common come back
                _ONE_LINE_REPLIES[line] = reply
            self._ready.append(reply)
            self._code = None
            self._texts = []

    def next_reply(self) -> Reply | None:
        return self._ready.popleft() if self._ready else None

    @property
    def next_reply_ready(self) -> bool:
        return bool(self._ready)

    @property
    def replies_ready(self) -> int:
        return len(self._ready)

    @property
    def last_ready(self) -> Reply | None:
        return self._ready[-1] if self._ready else None

    @property
    def has_partial(self) -> bool:
        return bool(self._buffer) or self._code is not None


def _show(line: bytes) -> str:
    return repr(line[:80])[2:-1] + ("..." if len(line) > 80 else "")


class ClientConnection:
    """The client's view of one SMTP conversation: what was sent, which replies are still owed."""

    def __init__(self, expect_greeting: bool = True) -> None:
        self._parser = ReplyParser()
        # RFC 5321 3.1: the server speaks first.
        self._awaiting: deque[str] = deque(["greeting"] if expect_greeting else [])

    @classmethod
    def after_starttls(cls) -> ClientConnection:
        """A fresh conversation over the new TLS layer: no greeting, the client speaks first (RFC 3207 4.2)."""
        return cls(expect_greeting=False)

    def send(self, command: Command) -> bytes:
        self._awaiting.append(command.verb)
        return command.line

    def send_group(self, commands: list[Command]) -> bytes:
        """Several commands at once (one RFC 2920 pipelined group)."""
        return b"".join(self.send(command) for command in commands)

    def send_message(self, body: bytes, replies: int = 1) -> bytes:
        """The message content after a 354 reply to DATA; the reply to it is named "message". An LMTP server
        answers once per accepted recipient (RFC 2033 4.2): pass their number as `replies`."""
        self._awaiting.extend(["message"] * replies)
        return dot_stuff(body)

    def send_message_parts(self, body: bytes, replies: int = 1) -> tuple[bytes, bytes]:
        """`send_message` in two parts to write one after the other (`dot_stuffed_parts`: no copy of the body
        when nothing needs stuffing)."""
        self._awaiting.extend(["message"] * replies)
        return dot_stuffed_parts(body)

    def receive_data(self, data: bytes) -> None:
        """Parse bytes from the server. More whole replies than commands sent is a protocol error at once (a
        server talking out of turn must not fill our memory while nobody reads)."""
        parser = self._parser
        parser.feed(data)
        if parser.replies_ready > len(self._awaiting):
            raise SmtpProtocolError(f"reply nobody asked for: {parser.last_ready}")

    @property
    def reply_ready(self) -> bool:
        """A whole reply is waiting to be taken with `next_reply`."""
        return self._parser.next_reply_ready

    def next_reply(self) -> tuple[str, Reply] | None:
        """The next complete reply and the command it answers, or None if more bytes are needed."""
        reply = self._parser.next_reply()
        if reply is None:
            return None
        if not self._awaiting:
            raise SmtpProtocolError(f"reply nobody asked for: {reply}")
        return self._awaiting.popleft(), reply

    @property
    def has_unread_bytes(self) -> bool:
        """Bytes received that are not yet a whole reply, or replies not yet taken."""
        return self._parser.has_partial or self._parser.next_reply_ready

    @property
    def awaiting(self) -> int:
        """How many replies the server still owes."""
        return len(self._awaiting)
