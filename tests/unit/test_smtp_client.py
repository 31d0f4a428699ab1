"""The sans-I/O SMTP client: reply parsing (RFC 5321 4.2), EHLO capabilities, commands, dot-stuffing and
pipelined groups (RFC 2920), all driven by feeding bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.smtp.client import (
    Capabilities,
    ClientConnection,
    Command,
    ReplyParser,
    SmtpProtocolError,
    dot_stuff,
    dot_stuffed_parts,
    pipeline_groups,
)
from cluster.smtp.replies import Reply

EHLO_REPLY = (b"250-mx.example.net Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
              b"250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")


def parse_all(data: bytes) -> list[Reply]:
    parser = ReplyParser()
    parser.feed(data)
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(reply)
    return replies


def test_single_line_reply_with_enhanced_code() -> None:
    (reply,) = parse_all(b"250 2.1.0 Sender ok\r\n")
    assert (reply.code, reply.enhanced, reply.text) == (250, "2.1.0", "Sender ok")


def test_multi_line_reply_is_one_reply() -> None:
    replies = parse_all(b"550-5.1.1 No such user\r\n550-5.1.1 here at all\r\n550 5.1.1 sorry\r\n")
    assert len(replies) == 1
    assert replies[0].code == 550 and replies[0].enhanced == "5.1.1"
    assert replies[0].lines == ("No such user", "here at all", "sorry")


def test_reply_split_across_reads_waits_for_the_end() -> None:
    parser = ReplyParser()
    parser.feed(b"250-first\r\n25")
    assert parser.next_reply() is None
    parser.feed(b"0 last\r")
    assert parser.next_reply() is None
    parser.feed(b"\n")
    reply = parser.next_reply()
    assert reply is not None and reply.lines == ("first", "last")


def test_code_alone_and_bare_lf_are_tolerated() -> None:
    replies = parse_all(b"250\r\n354 go ahead\n")
    assert [r.code for r in replies] == [250, 354]


@pytest.mark.parametrize("bad", [
    b"hello there\r\n",
    b"25 short\r\n",
    b"250Ok\r\n",
    b"650 no such class\r\n",
    b"250-first\r\n550 second\r\n",
])
def test_malformed_replies_raise_a_clear_error(bad: bytes) -> None:
    with pytest.raises(SmtpProtocolError) as info:
        parse_all(bad)
    assert "reply" in str(info.value)


def test_endless_line_is_refused() -> None:
    parser = ReplyParser()
    with pytest.raises(SmtpProtocolError, match="longer than"):
        parser.feed(b"250 " + b"x" * 10000)


def test_endless_multi_line_reply_is_refused() -> None:
    with pytest.raises(SmtpProtocolError, match="more than"):
        parse_all(b"250-x\r\n" * 500)


@given(st.binary(max_size=300))
def test_parser_never_fails_with_anything_but_a_protocol_error(data: bytes) -> None:
    parser = ReplyParser()
    try:
        parser.feed(data)
        while parser.next_reply() is not None:
            pass
    except SmtpProtocolError:
        pass


def test_ehlo_capabilities() -> None:
    (reply,) = parse_all(EHLO_REPLY)
    caps = Capabilities.from_ehlo(reply)
    assert caps.pipelining and caps.starttls and caps.eight_bit_mime and caps.smtputf8
    assert caps.size_limit == 10240000
    assert caps.offers("enhancedstatuscodes")


def test_size_without_number_means_no_fixed_limit_and_helo_means_nothing() -> None:
    caps = Capabilities.from_ehlo(Reply(250, "", ("mx", "SIZE")))
    assert caps.size_limit == 0
    assert Capabilities.helo_only().size_limit is None
    assert not Capabilities.helo_only().pipelining


def test_mail_command_parameters() -> None:
    assert Command.mail("a@b.example").line == b"MAIL FROM:<a@b.example>\r\n"
    assert Command.mail("", size=1234, body_8bit=True).line == b"MAIL FROM:<> SIZE=1234 BODY=8BITMIME\r\n"
    assert Command.rcpt("x@y.example").line == b"RCPT TO:<x@y.example>\r\n"
    assert Command.rcpt("jörg@bücher.de") == Command("RCPT", "RCPT TO:<jörg@bücher.de>\r\n".encode())


@pytest.mark.parametrize("bad", ["x@y.example>\r\nRCPT TO:<z@y.example", "x@y.example\n", "x\r@y", "x\0@y"])
def test_line_breaks_in_arguments_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        Command.rcpt(bad)


@pytest.mark.parametrize(("body", "wire"), [
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
    (b".start\r\n", b"..start\r\n.\r\n"),
    (b"no final line end", b"no final line end\r\n.\r\n"),
    (b"", b".\r\n"),
    (b"x\r\n.\r\n", b"x\r\n..\r\n.\r\n"),
])
def test_dot_stuffing(body: bytes, wire: bytes) -> None:
    assert dot_stuff(body) == wire


@given(st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"\xc3\xa9"]), max_size=20), st.booleans())
def test_the_two_parts_of_a_stuffed_message_are_the_stuffed_message(lines: list[bytes], line_end: bool) -> None:
    body = b"\r\n".join(lines) + (b"\r\n" if line_end else b"")
    head, tail = dot_stuffed_parts(body)
    assert head + tail == dot_stuff(body)
    if not (body.startswith(b".") or b"\r\n." in body or not body.endswith(b"\r\n")):
        assert head is body and tail == b".\r\n"  # nothing to stuff: the body itself, not a copy


@given(st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"\xc3\xa9"]), max_size=20))
def test_dot_stuffing_round_trips(lines: list[bytes]) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    wire = dot_stuff(body)
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    received = wire[:-3].split(b"\r\n")[:-1] if body else []
    assert [line[1:] if line.startswith(b".") else line for line in received] == lines


def test_pipeline_groups_end_at_data_and_ehlo() -> None:
    commands = [Command.ehlo("me"), Command.mail("a@b"), Command.rcpt("c@d"), Command.rcpt("e@f"), Command.data(),
                Command.quit()]
    assert [[c.verb for c in group] for group in pipeline_groups(commands)] == [
        ["EHLO"], ["MAIL", "RCPT", "RCPT", "DATA"], ["QUIT"]]


def test_connection_pairs_pipelined_replies_with_their_commands() -> None:
    conn = ClientConnection()
    conn.receive_data(b"220 mx ESMTP\r\n")
    assert conn.next_reply() == ("greeting", Reply(220, "", ("mx ESMTP",)))
    wire = conn.send_group([Command.mail("a@b"), Command.rcpt("c@d"), Command.rcpt("e@f"), Command.data()])
    assert wire == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n"
    conn.receive_data(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
    answers = []
    while (answer := conn.next_reply()) is not None:
        answers.append((answer[0], answer[1].code))
    assert answers == [("MAIL", 250), ("RCPT", 250), ("RCPT", 550), ("DATA", 354)]
    assert conn.send_message(b"hi\r\n") == b"hi\r\n.\r\n"
    conn.receive_data(b"250 2.0.0 queued\r\n")
    assert conn.next_reply() == ("message", Reply(250, "2.0.0", ("queued",)))
    assert conn.awaiting == 0


def test_unsolicited_reply_is_a_protocol_error() -> None:
    conn = ClientConnection.after_starttls()
    with pytest.raises(SmtpProtocolError, match="nobody asked"):
        conn.receive_data(b"250 surprise\r\n")  # at once: a server talking out of turn is not buffered


def test_replies_beyond_the_commands_sent_are_refused_as_they_arrive() -> None:
    conn = ClientConnection()
    conn.receive_data(b"220 hello\r\n")  # the greeting is owed
    conn.send(Command.noop())
    with pytest.raises(SmtpProtocolError, match="nobody asked for: 250 2"):
        conn.receive_data(b"250 1\r\n250 2\r\n")
