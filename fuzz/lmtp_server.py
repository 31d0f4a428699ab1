"""Fuzz target: the sans-I/O LMTP server machine (cluster/smtp/lmtp.py) as the mailbox role drives it.

Input and invariants as fuzz/smtp_server.py (the LMTP machine is the SMTP machine with LHLO and per-recipient
answers), with LHLO among the verbs and the end of DATA answered by `respond_recipients`, one fuzz-chosen reply
per accepted recipient (RFC 2033 4.2). Also: the machine hands over no message without recipients, and it
never raises for what a client sends (`ProtocolUsageError` would mean the driver broke the calling protocol).
"""

from __future__ import annotations

from cluster.smtp.lmtp import LmtpServerConnection
from cluster.smtp.server import MessageReceived
from fuzz import smtp_server
from fuzz.common import Choices

VERBS = (b"LHLO", b"lhlo", *smtp_server.VERBS)


class LmtpDriver(smtp_server.Driver):
    def __init__(self, settings: smtp_server.ServerSettings, choices: Choices) -> None:
        super().__init__(settings, choices)
        self.conn = LmtpServerConnection(settings)

    def answer_message(self, event: MessageReceived) -> None:
        self.messages.append(event)
        assert event.recipients, "a message handed over without recipients"
        answers = [self.choices.pick(smtp_server.DATA_ANSWERS) for _ in event.recipients]
        self.conn.respond_recipients(answers)


def fuzz_one(data: bytes) -> None:
    smtp_server.fuzz_session(data, LmtpDriver, VERBS)
