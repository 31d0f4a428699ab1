"""The sans-I/O LMTP server (RFC 2033) and the LMTP side of the SMTP client machine, driven by bytes."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.config import SmtpConfig
from cluster.smtp import replies
from cluster.smtp.client import ClientConnection, Command
from cluster.smtp.events import MailRequested, MessageReceived, NeedData, RcptRequested
from cluster.smtp.lmtp import LmtpServerConnection
from cluster.smtp.replies import Reply
from cluster.smtp.server import ProtocolUsageError, ServerSettings
from tests.support.smtp_driver import parse_replies

SETTINGS = dataclasses.replace(ServerSettings.from_config(SmtpConfig(hostname="mbox.test")), max_message_size=65536)


class Driver:
    """Feeds bytes; answers MAIL/RCPT from `rcpt` (local part -> reply) and end of data from `stored`."""

    def __init__(self, rcpt: dict[str, Reply] | None = None, stored: dict[str, Reply] | None = None) -> None:
        self.conn = LmtpServerConnection(SETTINGS)
        self.rcpt = rcpt or {}
        self.stored = stored or {}
        self.messages: list[MessageReceived] = []
        self.output = bytearray()
        self.conn.start()
        self.pump()

    def feed(self, data: bytes) -> list[Reply]:
        self.conn.receive_data(data)
        self.pump()
        return parse_replies(bytes(self.output))

    def pump(self) -> None:
        while (event := self.conn.next_event()) is not NeedData:
            if isinstance(event, MailRequested):
                self.conn.respond(replies.SENDER_OK)
            elif isinstance(event, RcptRequested):
                self.conn.respond(self.rcpt.get(event.recipient.local_part, replies.RECIPIENT_OK))
            elif isinstance(event, MessageReceived):
                self.messages.append(event)
                self.conn.respond_recipients([self.stored.get(r.local_part, replies.lmtp_delivered("f"))
                                              for r in event.recipients])
        self.output += self.conn.data_to_send()


def codes(answers: list[Reply]) -> list[int]:
    return [answer.code for answer in answers]


def test_greeting_says_lmtp_and_only_lhlo_is_accepted() -> None:
    """RFC 2033 4.1: LHLO replaces EHLO; HELO and EHLO are not LMTP commands."""
    driver = Driver()
    answers = driver.feed(b"EHLO w\r\nHELO w\r\nLHLO worker.test\r\n")
    assert answers[0] == replies.lmtp_greeting("mbox.test")
    assert answers[1:3] == [replies.UNKNOWN_COMMAND, replies.UNKNOWN_COMMAND]
    assert answers[3].code == 250 and "PIPELINING" in answers[3].lines and "ENHANCEDSTATUSCODES" in answers[3].lines


def test_one_reply_per_accepted_recipient_in_rcpt_order() -> None:
    """RFC 2033 4.2: after the final dot, one reply for each successful RCPT, each with its own outcome."""
    driver = Driver(rcpt={"ghost": replies.BAD_MAILBOX_NAME},
                    stored={"full": replies.MAILBOX_OVER_QUOTA, "huge": replies.MESSAGE_EXCEEDS_QUOTA})
    answers = driver.feed(b"LHLO w\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nRCPT TO:<ghost@l.test>\r\n"
                          b"RCPT TO:<full@l.test>\r\nRCPT TO:<huge@l.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert codes(answers) == [220, 250, 250, 250, 550, 250, 250, 354, 250, 452, 552]
    assert answers[-2:] == [replies.MAILBOX_OVER_QUOTA, replies.MESSAGE_EXCEEDS_QUOTA]
    (message,) = driver.messages
    assert [r.local_part for r in message.recipients] == ["a", "full", "huge"]
    # The transaction is over: a new one may start at once.
    assert codes(driver.feed(b"MAIL FROM:<s@x.test>\r\n"))[-1] == 250


def test_a_message_the_machine_refuses_gets_the_refusal_once_per_recipient() -> None:
    driver = Driver()
    answers = driver.feed(b"LHLO w\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nRCPT TO:<b@l.test>\r\n"
                          b"DATA\r\nbare\nline feed\r\n.\r\n")
    assert answers[-2:] == [replies.BARE_LINE_ENDING_IN_DATA] * 2
    assert driver.messages == []


def test_data_without_an_accepted_recipient_is_503() -> None:
    """RFC 2033 4.2: "the DATA command MUST fail with a 503 reply code"."""
    driver = Driver(rcpt={"ghost": replies.BAD_MAILBOX_NAME})
    answers = driver.feed(b"LHLO w\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<ghost@l.test>\r\nDATA\r\n")
    assert answers[-1] == replies.LMTP_NO_VALID_RECIPIENTS


def test_end_of_data_must_be_answered_per_recipient() -> None:
    conn = LmtpServerConnection(SETTINGS)
    conn.start()
    conn.receive_data(b"LHLO w\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nx\r\n.\r\n")
    while not isinstance(event := conn.next_event(), MessageReceived):
        assert event is not NeedData
        conn.respond(replies.OK)
    with pytest.raises(ProtocolUsageError):
        conn.respond(replies.OK)
    with pytest.raises(ProtocolUsageError):
        conn.respond_recipients([replies.OK, replies.OK])
    conn.respond_recipients([replies.OK])


def test_client_expects_one_reply_per_recipient_after_the_message() -> None:
    client = ClientConnection()
    client.receive_data(b"220 mbox.test LMTP\r\n")
    assert client.next_reply() is not None
    assert client.send(Command.lhlo("w.test")) == b"LHLO w.test\r\n"
    client.send_message(b"x\r\n", replies=3)
    client.receive_data(b"250 LHLO ok\r\n250 2.0.0 a\r\n452 4.2.2 b\r\n250 2.0.0 c\r\n")
    answers = [client.next_reply() for _ in range(4)]
    assert [(what, reply.code) for what, reply in answers if reply] == [
        ("LHLO", 250), ("message", 250), ("message", 452), ("message", 250)]
    assert client.awaiting == 0
