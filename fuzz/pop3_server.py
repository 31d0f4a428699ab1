"""Fuzz target: the sans-I/O POP3 server machine (cluster/mailbox/pop3_protocol.py) as the pop3 role drives it.

Input: settings (STLS available or not, plaintext allowed or not), then either raw byte chunks or whole command
lines (verbs from a list, arguments from the fuzz bytes) fed one by one; every decision is answered with a
fuzz-chosen outcome (login right, wrong or unavailable; maildrop open, locked or failing; message readable or
gone) and a maildrop of awkward messages (bare LF, lines that are ".", no final line end).

Invariants: no exception at all (the module raises only on glue misuse); every output line ends with CRLF and
holds no other CR or LF; in line-by-line mode each answer starts with "+OK" or "-ERR", a multi-line answer
(CAPA, LIST, UIDL, RETR, TOP) ends with a "." line and has no other, and RETR gives back the message with CRLF
line ends once un-stuffed (TOP a prefix of it).
"""

from __future__ import annotations

from cluster.mailbox.pop3_protocol import (
    CredentialCheck,
    CredentialsReceived,
    MaildropRequested,
    MessageInfo,
    MessageRequested,
    NeedData,
    Paused,
    Pop3Connection,
    Pop3Settings,
    SessionEnded,
    StartTlsRequested,
    UpdateRequested,
    normalize_message,
)
from fuzz.common import CRLF, Choices, crlf_lines

CONTENTS = (b"Subject: one\r\n\r\nbody\r\n", b"Subject: two\n\n.\n..\n.x\nlast", b"", b".\r\n",
            b"Subject: three\r\n\r\n" + b"y" * 1200 + b"\r\n", b"no header or body separator\r\n")
VERBS = (b"USER", b"PASS", b"STLS", b"CAPA", b"QUIT", b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"NOOP",
         b"RSET", b"user", b"XTND")
ARGUMENTS = (b"", b" alice", b" secret", b" 1", b" 2", b" 0", b" 99", b" 1 0", b" 1 2", b" 2 999999999",
             b" -1", b" 1 x", b" \xc3\xa9", b"  1", b" 1 ")
MULTI_LINE_ALWAYS = {b"CAPA", b"RETR", b"TOP"}
MULTI_LINE_WITHOUT_ARGUMENT = {b"LIST", b"UIDL"}
CHECKS = (CredentialCheck.OK, CredentialCheck.OK, CredentialCheck.INVALID, CredentialCheck.UNAVAILABLE)


class Driver:
    def __init__(self, choices: Choices) -> None:
        self.choices = choices
        settings = Pop3Settings(hostname="pop.fuzz.test", tls_available=choices.flag(),
                                max_errors=1 + choices.below(12), max_auth_failures=1 + choices.below(4))
        self.conn = Pop3Connection(settings, plaintext_auth_allowed=choices.flag())
        self.maildrop = [CONTENTS[i % len(CONTENTS)] for i in range(choices.below(len(CONTENTS) + 1))]
        self.retrieved: list[tuple[bytes, int | None]] = []  # (content given, TOP lines or None for RETR)
        self.output = bytearray()

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NeedData or event is Paused:
                break
            if isinstance(event, SessionEnded):
                continue
            if isinstance(event, CredentialsReceived):
                self.conn.credentials_checked(CHECKS[self.choices.below(len(CHECKS))])
            elif isinstance(event, MaildropRequested):
                if self.choices.below(4) == 0:
                    self.conn.maildrop_unavailable(in_use=self.choices.flag())
                else:
                    self.conn.maildrop_opened([MessageInfo(f"uid{i}", len(normalize_message(content)))
                                               for i, content in enumerate(self.maildrop)])
            elif isinstance(event, MessageRequested):
                content = self.maildrop[event.number - 1] if self.choices.below(8) else None
                if content is not None:
                    self.retrieved.append((content, event.top_lines))
                self.conn.message_loaded(content)
            elif isinstance(event, UpdateRequested):
                self.conn.update_done(self.choices.below(2))
            elif isinstance(event, StartTlsRequested):
                self.output += self.conn.data_to_send()
                self.conn.tls_established()
            else:
                raise AssertionError(f"unexpected event {event!r}")
        self.output += self.conn.data_to_send()


def fuzz_one(data: bytes) -> None:
    choices = Choices(data)
    driver = Driver(choices)
    driver.conn.start()
    driver.pump()
    line_by_line = choices.flag()
    while not choices.exhausted and not driver.conn.closed:
        if line_by_line:
            verb = choices.pick(VERBS)
            argument = choices.pick(ARGUMENTS) if choices.flag() else choices.chunk(30)
            argument = argument.replace(b"\r", b"").replace(b"\n", b"")
            before, retrieved = len(driver.output), len(driver.retrieved)
            driver.conn.receive_data(verb + argument + CRLF)
            driver.pump()
            check_answer(verb.upper(), argument, bytes(driver.output[before:]), driver.retrieved[retrieved:])
        else:
            driver.conn.receive_data(choices.chunk())
            driver.pump()
    if choices.flag():
        driver.conn.timed_out()
    driver.conn.receive_data(b"")
    driver.pump()
    lines = crlf_lines(bytes(driver.output), "pop3 server")
    assert lines and lines[0].startswith(b"+OK "), "no +OK greeting"


def check_answer(verb: bytes, argument: bytes, answer: bytes, retrieved: list[tuple[bytes, int | None]]) -> None:
    lines = crlf_lines(answer, f"answer to {verb!r}")
    if not lines:
        return  # nothing to say yet (a decision is still pending) or the session is over
    assert lines[0].startswith((b"+OK", b"-ERR")), f"answer to {verb!r} starts with {lines[0][:40]!r}"
    multi_line = verb in MULTI_LINE_ALWAYS or (verb in MULTI_LINE_WITHOUT_ARGUMENT and not argument.strip())
    if not (multi_line and lines[0].startswith(b"+OK")):
        for line in lines:
            assert line.startswith((b"+OK", b"-ERR")), f"answer to {verb!r} has a stray line {line[:40]!r}"
        return
    assert lines[-1] == b".", f"multi-line answer to {verb!r} does not end with a '.' line"
    body = lines[1:-1]
    assert b"." not in body, f"multi-line answer to {verb!r} has an unstuffed '.' line"
    if verb in (b"RETR", b"TOP"):
        (content, top_lines), = retrieved
        sent = b"".join((line[1:] if line.startswith(b".") else line) + CRLF for line in body)
        whole = normalize_message(content)
        assert whole.startswith(sent), f"{verb!r} sent something other than the message"
        if top_lines is None:
            assert sent == whole, "RETR did not send the whole message"
