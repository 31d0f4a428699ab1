"""Events the sans-I/O SMTP server (`cluster.smtp.server.ServerConnection.next_event`) hands to the glue.

Decision events (`MailRequested`, `RcptRequested`, `MessageReceived`, and for verbs the glue implements
itself `ExtensionCommand` / `ExtensionLine`) pause the connection until the glue calls `respond(reply)`.
`SessionEnded` (shared with POP3, from `cluster.sansio`) is informational; its `reason` is one of: "quit",
"client closed the connection", "client closed the connection during DATA", "client closed the connection
during BDAT", "too many errors", "timeout". `NeedData` and `Paused` are sentinel classes (not instances), as
in h11: `NeedData` means feed more bytes, `Paused` means a decision is still awaiting `respond`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.sansio import NeedData as NeedData
from cluster.sansio import Paused as Paused
from cluster.sansio import SessionEnded as SessionEnded
from cluster.smtp.address import Address


@dataclass(frozen=True)
class MailRequested:
    """MAIL FROM was syntactically valid. `sender` None is the null reverse-path <> (bounces, RFC 5321 4.5.5)."""

    sender: Address | None
    params: dict[str, str | None] = field(default_factory=dict)
    size: int | None = None


@dataclass(frozen=True, init=False)
class RcptRequested:
    """RCPT TO was syntactically valid and within limits; the glue applies relay policy. (One per recipient:
    the constructor fills the dict at once instead of the frozen dataclass's `object.__setattr__` calls.)"""

    recipient: Address
    params: dict[str, str | None] = field(default_factory=dict)

    def __init__(self, recipient: Address, params: dict[str, str | None] | None = None) -> None:
        self.__dict__.update(recipient=recipient, params={} if params is None else params)


@dataclass(frozen=True)
class MessageReceived:
    """A complete, acceptable message: `data` is dot-unstuffed, CRLF line endings, without the final ".\\r\\n".

    `body_8bit` is True when the client declared BODY=8BITMIME or the data holds any octet above 127.
    """

    sender: Address | None
    recipients: tuple[Address, ...]
    data: bytes
    body_8bit: bool
    smtputf8: bool


@dataclass(frozen=True)
class ExtensionCommand:
    """A verb listed in `ServerSettings.extension_commands` (e.g. STARTTLS, AUTH) that the glue implements.

    The glue answers with `respond()`. A 334 reply (RFC 4954 4) makes the next client line an `ExtensionLine`
    instead of a command; a 2xx reply to STARTTLS makes the machine discard buffered input and wait for
    `ServerConnection.starttls_completed()` (RFC 3207 4.2).
    """

    verb: str
    argument: str


@dataclass(frozen=True)
class ExtensionLine:
    """The client's line after a 334 reply (an AUTH response; "*" cancels, RFC 4954 4), without its CRLF.

    `line` is the raw octets (not checked: the glue decodes them strictly), or None when the line was longer
    than `ServerSettings.max_continuation_line` and was discarded.
    """

    verb: str
    line: bytes | None


Event = MailRequested | RcptRequested | MessageReceived | ExtensionCommand | ExtensionLine | SessionEnded
DecisionEvent = MailRequested | RcptRequested | MessageReceived | ExtensionCommand | ExtensionLine
