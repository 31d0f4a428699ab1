"""Test driver for the sans-I/O SMTP server: feed byte chunks, collect events and parsed replies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cluster.config import SmtpConfig
from cluster.smtp import replies
from cluster.smtp.events import (
    Event,
    ExtensionCommand,
    ExtensionLine,
    MailRequested,
    MessageReceived,
    NeedData,
    Paused,
    RcptRequested,
)
from cluster.smtp.replies import Reply
from cluster.smtp.server import ServerConnection, ServerSettings

Decider = Callable[[Event], Reply]

# What the frontend answers to end of DATA once the message is stored (`replies.queued_as`).
QUEUED = replies.queued_as(["00TESTQUEUEID"])


def accept_all(event: Event) -> Reply:
    if isinstance(event, MailRequested):
        return replies.SENDER_OK
    if isinstance(event, RcptRequested):
        return replies.RECIPIENT_OK
    return QUEUED


@dataclass
class Session:
    conn: ServerConnection
    decide: Decider = accept_all
    events: list[Event] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.pump()

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NeedData:
                break
            assert event is not Paused, "driver always responds, so it must never see Paused"
            assert not isinstance(event, type)
            self.events.append(event)
            if isinstance(event, MailRequested | RcptRequested | MessageReceived | ExtensionCommand | ExtensionLine):
                self.conn.respond(self.decide(event))
        self.output += self.conn.data_to_send()

    @property
    def replies(self) -> list[Reply]:
        return parse_replies(bytes(self.output))

    @property
    def messages(self) -> list[MessageReceived]:
        return [e for e in self.events if isinstance(e, MessageReceived)]


_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(SmtpConfig))


def server_settings(**values: Any) -> ServerSettings:
    """Settings as a frontend builds them from the configuration defaults (`cluster.config.SmtpConfig`), with
    hostname mx.example.test, CHUNKING off unless asked for, and `values` replaced (config keys or the glue's
    fields such as extension_commands)."""
    config = {"hostname": "mx.example.test", "chunking": False}
    config.update({k: v for k, v in values.items() if k in _CONFIG_KEYS})
    glue = {k: v for k, v in values.items() if k not in _CONFIG_KEYS}
    return dataclasses.replace(ServerSettings.from_config(SmtpConfig(**config)), **glue)


def make_session(settings: ServerSettings | None = None, decide: Decider = accept_all) -> Session:
    conn = ServerConnection(settings or server_settings())
    session = Session(conn, decide)
    conn.start()
    session.pump()
    return session


def run(chunks: Iterable[bytes], settings: ServerSettings | None = None, decide: Decider = accept_all) -> Session:
    session = make_session(settings, decide)
    for chunk in chunks:
        session.feed(chunk)
    return session


def parse_replies(output: bytes) -> list[Reply]:
    """Split server output into replies (RFC 5321 4.2.1 multi-line "code-" continuation)."""
    result: list[Reply] = []
    texts: list[str] = []
    for line in output.decode("utf-8").split("\r\n")[:-1]:
        code, separator, text = int(line[:3]), line[3:4], line[4:]
        texts.append(text)
        if separator != "-":
            result.append(Reply.from_lines(code, texts))
            texts = []
    assert not texts, "unterminated multi-line reply"
    return result


def greeted(*commands: bytes) -> bytes:
    """EHLO plus the given CRLF-less command lines, as one byte string."""
    return b"".join(line + b"\r\n" for line in (b"EHLO client.example", *commands))
