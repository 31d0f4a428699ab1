"""Fuzz target: the sans-I/O SMTP server machine (cluster/smtp/server.py) as a frontend drives it.

Input: a settings variant, then a session of command lines (verbs from a list, arguments from the fuzz bytes),
message data and raw byte chunks, fed in pieces of fuzz-chosen sizes; every decision event is answered with a
fuzz-chosen reply, as the frontend glue would (including STARTTLS handshakes and AUTH continuations).

Invariants: no exception at all (the module raises only on glue misuse, which this driver never does); the
output is a sequence of well-formed replies, each line ended by CRLF and no longer than 512 octets, starting
with a 220 greeting; after a 221 or 421 nothing more is sent; a received message has only CRLF line ends,
lines within `max_text_line`, a size within `max_message_size` and between 1 and `max_recipients` recipients.
"""

from __future__ import annotations

import dataclasses

from cluster.config import config_from_dict
from cluster.smtp import replies
from cluster.smtp.replies import Reply
from cluster.smtp.server import (
    ExtensionCommand,
    ExtensionLine,
    MailRequested,
    MessageReceived,
    NeedData,
    Paused,
    RcptRequested,
    ServerConnection,
    ServerSettings,
    SessionEnded,
)
from fuzz.common import Choices, crlf_lines, smtp_replies

VERBS = (b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET", b"NOOP", b"QUIT", b"VRFY",
         b"EXPN", b"HELP", b"STARTTLS", b"AUTH", b"ehlo", b"mail from:", b"rcpt to:")
ARGUMENTS = (b"", b" client.example", b"<a@b.example>", b"<>", b"<a@b.example> SIZE=100", b" 5", b" 10 LAST",
             b"<a@b.example> BODY=8BITMIME SMTPUTF8", b"<@x,@y:a@b.example>", b"<Postmaster>", b" PLAIN",
             b" PLAIN dGVzdAB0ZXN0AHRlc3Q=", b"<\"quoted local\"@b.example>", b"<a@[127.0.0.1]>",
             b"<a@b.example> AUTH=<>")
DATA_LINES = (b"Subject: fuzz", b"", b".", b"..", b".leading dot", b"x" * 990, b"\xc3\xa9t\xc3\xa9", b"a\rb", b"a\nb")

MAIL_ANSWERS = (replies.SENDER_OK, Reply.of(550, "5.7.1", "Sender refused"), Reply.of(451, "4.3.0", "Try later"))
RCPT_ANSWERS = (replies.RECIPIENT_OK, Reply.of(550, "5.7.1", "Relay denied"), Reply.of(452, "4.5.3", "Full"))
DATA_ANSWERS = (replies.queued_as(["FUZZ0001"]), Reply.of(451, "4.3.0", "Not stored"))
STARTTLS_ANSWERS = (Reply.of(220, "2.0.0", "Ready to start TLS"), Reply.of(454, "4.7.0", "TLS not available"))
AUTH_ANSWERS = (Reply.of(334, "", ""), Reply.of(334, "", "VXNlcm5hbWU6"), Reply.of(235, "2.7.0", "Authenticated"),
                Reply.of(535, "5.7.8", "Authentication failed"), Reply.of(501, "5.5.2", "Cannot decode"))


DEFAULTS = ServerSettings.from_config(config_from_dict({"smtp": {"hostname": "mx.fuzz.test"}}, environ={}).smtp)


def settings_from(choices: Choices) -> ServerSettings:
    """The built-in limits, or much smaller ones to reach the limit paths with short inputs."""
    variant = choices.byte()
    small = bool(variant & 1)
    return dataclasses.replace(
        DEFAULTS,
        max_text_line=78 if small else DEFAULTS.max_text_line,
        max_message_size=300 if small else DEFAULTS.max_message_size,
        max_recipients=2 if small else DEFAULTS.max_recipients,
        max_errors=3 if variant & 2 else DEFAULTS.max_errors,
        chunking=bool(variant & 4),
        extra_extensions=("STARTTLS", "AUTH PLAIN LOGIN") if variant & 8 else (),
        extension_commands=frozenset({"STARTTLS", "AUTH"}) if variant & 8 else frozenset(),
        extra_mail_parameters=frozenset({"AUTH"}) if variant & 16 else frozenset(),
    )


def session_input(choices: Choices, verbs: tuple[bytes, ...] = VERBS) -> bytes:
    """Command lines, message data and raw chunks, as one byte string."""
    pieces: list[bytes] = []
    while not choices.exhausted and len(pieces) < 64:
        kind = choices.below(4)
        if kind == 0:
            pieces.append(choices.pick(verbs) + choices.pick(ARGUMENTS) + b"\r\n")
        elif kind == 1:
            pieces.append(choices.pick(verbs) + choices.chunk(40) + choices.pick((b"\r\n", b"\n", b"\r", b"")))
        elif kind == 2:
            lines = [choices.pick(DATA_LINES) for _ in range(choices.below(6))]
            pieces.append(b"".join(line + b"\r\n" for line in lines) + choices.pick((b".\r\n", b"", b".\n")))
        else:
            pieces.append(choices.chunk())
    return b"".join(pieces)


class Driver:
    def __init__(self, settings: ServerSettings, choices: Choices) -> None:
        self.settings = settings
        self.choices = choices
        self.conn = ServerConnection(settings)
        self.output = bytearray()
        self.messages: list[MessageReceived] = []
        self.ended = False

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NeedData:
                break
            if event is Paused:
                # Only a STARTTLS the glue accepted leaves the machine paused with nothing to answer: the glue
                # flushes the 220, does the handshake, and tells the machine.
                self.output += self.conn.data_to_send()
                self.conn.starttls_completed()
                continue
            if isinstance(event, SessionEnded):
                self.ended = True
            elif isinstance(event, MailRequested):
                self.conn.respond(self.choices.pick(MAIL_ANSWERS))
            elif isinstance(event, RcptRequested):
                self.conn.respond(self.choices.pick(RCPT_ANSWERS))
            elif isinstance(event, MessageReceived):
                self.answer_message(event)
            elif isinstance(event, ExtensionCommand):
                answers = STARTTLS_ANSWERS if event.verb == "STARTTLS" else AUTH_ANSWERS
                self.conn.respond(self.choices.pick(answers))
            elif isinstance(event, ExtensionLine):
                self.conn.respond(self.choices.pick(AUTH_ANSWERS[1:]))
            else:
                raise AssertionError(f"unexpected event {event!r}")
        self.output += self.conn.data_to_send()

    def answer_message(self, event: MessageReceived) -> None:
        self.messages.append(event)
        self.conn.respond(self.choices.pick(DATA_ANSWERS))


def fuzz_one(data: bytes) -> None:
    fuzz_session(data, Driver, VERBS)


def fuzz_session(data: bytes, driver_class: type[Driver], verbs: tuple[bytes, ...]) -> None:
    """One session of `driver_class`'s machine from the fuzz bytes, then the checks (shared with LMTP)."""
    choices = Choices(data)
    settings = settings_from(choices)
    stream = session_input(Choices(choices.chunk()) if choices.flag() else choices, verbs)
    driver = driver_class(settings, choices)
    driver.conn.start()
    driver.pump()
    position = 0
    while position < len(stream):
        size = 1 + choices.below(64) if choices.flag() else len(stream)
        closed_before = driver.conn.closed
        sent_before = len(driver.output)
        driver.conn.receive_data(stream[position:position + size])
        position += size
        driver.pump()
        if closed_before:
            assert len(driver.output) == sent_before, "output after the session was closed"
    if choices.flag():
        driver.conn.timed_out()
        driver.pump()
    driver.conn.receive_data(b"")
    driver.pump()
    check(driver)


def check(driver: Driver) -> None:
    settings = driver.settings
    answered = smtp_replies(bytes(driver.output), "smtp server")
    assert answered and answered[0][0] == 220, "the session does not start with a 220 greeting"
    for index, (code, _) in enumerate(answered):
        if code in (221, 421):
            assert index == len(answered) - 1, f"reply after {code}: {answered[index + 1:]!r}"
    for message in driver.messages:
        assert 1 <= len(message.recipients) <= settings.max_recipients, message.recipients
        assert len(message.data) <= settings.max_message_size, len(message.data)
        for line in crlf_lines(message.data, "received message"):
            assert len(line) + 2 <= settings.max_text_line, f"text line of {len(line) + 2} octets accepted"
