"""Small parts of the SMTP client machine that the broader tests (test_smtp_client.py) did not pin down,
found by mutation testing: the HELO-only capabilities, the conversation after STARTTLS, the last pipeline
group, the exact command lines, and the exact limits of the reply parser."""

from __future__ import annotations

import pytest

from cluster.smtp.client import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    Capabilities,
    ClientConnection,
    Command,
    ReplyParser,
    SmtpProtocolError,
    pipeline_groups,
)


def test_helo_only_capabilities_offer_nothing() -> None:
    capabilities = Capabilities.helo_only()
    assert capabilities.esmtp is False and capabilities.extensions == {}
    assert capabilities.size_limit is None and not capabilities.pipelining


def test_after_starttls_the_client_speaks_first() -> None:
    conn = ClientConnection.after_starttls()
    assert conn.awaiting == 0
    conn.send(Command.ehlo("me.example"))
    conn.receive_data(b"250 mx.example\r\n")
    answer = conn.next_reply()
    assert answer is not None and answer[0] == "EHLO"


def test_commands_after_the_last_group_ender_form_a_group_of_their_own() -> None:
    mail, rcpt, data = Command.mail("a@b.example"), Command.rcpt("c@d.example"), Command.data()
    assert pipeline_groups([mail, rcpt]) == [[mail, rcpt]]
    assert pipeline_groups([data, mail, rcpt]) == [[data], [mail, rcpt]]


def test_every_command_on_the_wire() -> None:
    assert Command.ehlo("me.example").line == b"EHLO me.example\r\n"
    assert Command.helo("me.example").line == b"HELO me.example\r\n"
    assert Command.rset().line == b"RSET\r\n" and Command.noop().line == b"NOOP\r\n"
    assert Command.starttls().line == b"STARTTLS\r\n" and Command.quit().line == b"QUIT\r\n"
    assert Command.mail("a@b.example", size=10, body_8bit=True, smtputf8=True).line == (
        b"MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n")
    assert Command.mail("\u00e9@b.example", smtputf8=True).line == "MAIL FROM:<\u00e9@b.example> SMTPUTF8\r\n".encode()


def test_an_ehlo_reply_means_esmtp() -> None:
    conn = ClientConnection()
    conn.receive_data(b"250-mx.example\r\n250 SIZE 100\r\n")
    answer = conn.next_reply()
    assert answer is not None
    capabilities = Capabilities.from_ehlo(answer[1])
    assert capabilities.esmtp is True and capabilities.size_limit == 100


def test_reply_line_and_reply_length_limits_are_exact() -> None:
    parser = ReplyParser()
    longest = b"250 " + b"x" * (MAX_REPLY_LINE - 4)
    parser.feed(longest)  # no line end yet, and exactly at the limit
    parser.feed(b"\r\n")
    reply = parser.next_reply()
    assert reply is not None and len(reply.lines[0]) == MAX_REPLY_LINE - 4
    with pytest.raises(SmtpProtocolError, match=f"reply line longer than {MAX_REPLY_LINE} octets"):
        ReplyParser().feed(longest + b"x\r\n")
    many = b"".join(b"250-line\r\n" for _ in range(MAX_REPLY_LINES - 1)) + b"250 last\r\n"
    parser.feed(many)
    reply = parser.next_reply()
    assert reply is not None and len(reply.lines) == MAX_REPLY_LINES
    with pytest.raises(SmtpProtocolError, match=f"more than {MAX_REPLY_LINES} lines"):
        ReplyParser().feed(b"250-line\r\n" * MAX_REPLY_LINES + b"250 last\r\n")


def test_an_empty_line_is_a_malformed_reply_and_bad_utf8_is_replaced() -> None:
    with pytest.raises(SmtpProtocolError, match="malformed reply line"):
        ReplyParser().feed(b"\n")
    parser = ReplyParser()
    parser.feed(b"250 caf\xe9\r\n")
    reply = parser.next_reply()
    assert reply is not None and reply.lines == ("caf\ufffd",)
