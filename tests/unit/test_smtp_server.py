"""The sans-I/O SMTP server state machine: commands, replies, limits, pipelining, DATA framing."""

from __future__ import annotations

import pytest

from cluster.config import SmtpConfig
from cluster.smtp import replies
from cluster.smtp.address import Address
from cluster.smtp.events import (
    Event,
    ExtensionCommand,
    ExtensionLine,
    MailRequested,
    MessageReceived,
    NeedData,
    Paused,
    RcptRequested,
    SessionEnded,
)
from cluster.smtp.replies import Reply
from cluster.smtp.server import ProtocolUsageError, ServerConnection, ServerSettings
from tests.support.smtp_driver import QUEUED, Decider, accept_all, greeted, make_session, run, server_settings

EHLO = replies.ehlo_reply(
    "mx.example.test",
    "client.example",
    ("PIPELINING", f"SIZE {25 * 2**20}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"),
)
GREETING = replies.greeting("mx.example.test")


def transaction(body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> bytes:
    return greeted(b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"DATA") + body + b".\r\n"


# --- greeting, EHLO, HELO ---


def test_greeting_and_ehlo_advertise_exactly_the_implemented_extensions() -> None:
    session = run([b"EHLO client.example\r\n"])
    assert session.replies == [GREETING, EHLO]
    assert bytes(session.output).startswith(b"220 mx.example.test ESMTP mtacluster\r\n")
    assert session.conn.helo_name == "client.example"


def test_extra_extensions_are_advertised() -> None:
    settings = server_settings(extra_extensions=("STARTTLS",))
    session = run([b"EHLO c\r\n"], settings)
    assert session.replies[-1].lines[-1] == "STARTTLS"


def test_helo_reply() -> None:
    session = run([b"HELO client.example\r\n"])
    assert session.replies[-1] == replies.helo_reply("mx.example.test", "client.example")
    assert session.conn.helo_name == "client.example"


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"EHLO \r\n", b"HELO\r\n", b"EHLO a b\r\n"])
def test_helo_without_a_single_name_is_a_syntax_error(line: bytes) -> None:
    assert run([line]).replies[-1] == replies.HELO_SYNTAX


def test_verbs_are_case_insensitive() -> None:
    session = run([b"ehlo c\r\nmail FROM:<a@b.example>\r\nrcpt to:<c@d.example>\r\nnoop\r\nRsEt\r\n"])
    assert session.replies[2:] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.OK, replies.RESET_OK]


def test_from_config_copies_limits() -> None:
    config = SmtpConfig(hostname="mx.cfg.test", max_recipients=7, max_errors=3)
    settings = ServerSettings.from_config(config)
    assert settings.hostname == "mx.cfg.test"
    assert settings.max_recipients == 7
    assert settings.max_errors == 3
    assert settings.max_message_size == config.max_message_size
    assert settings.max_command_line == config.max_command_line
    assert settings.max_text_line == config.max_text_line


# --- a whole transaction ---


def test_full_transaction_emits_events_in_order_with_replies() -> None:
    session = run([transaction() + b"QUIT\r\n"])
    assert session.replies == [
        GREETING,
        EHLO,
        replies.SENDER_OK,
        replies.RECIPIENT_OK,
        replies.START_DATA,
        QUEUED,
        replies.BYE,
    ]
    mail, rcpt, message, ended = session.events
    assert mail == MailRequested(Address("alice", "example.org"), {}, None)
    assert rcpt == RcptRequested(Address("bob", "example.net"), {})
    assert message == MessageReceived(
        sender=Address("alice", "example.org"),
        recipients=(Address("bob", "example.net"),),
        data=b"Subject: hi\r\n\r\nhello\r\n",
        body_8bit=False,
        smtputf8=False,
    )
    assert ended == SessionEnded("quit")
    assert session.conn.closed


def test_null_reverse_path_and_parameters() -> None:
    session = run([greeted(b"MAIL FROM:<> SIZE=1000 BODY=8BITMIME SMTPUTF8")])
    assert session.events == [MailRequested(None, {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None}, 1000)]


def test_space_after_colon_is_tolerated() -> None:
    session = run([greeted(b"MAIL FROM: <a@b.example>", b"RCPT TO: <c@d.example>")])
    assert session.replies[-2:] == [replies.SENDER_OK, replies.RECIPIENT_OK]


def test_every_spelling_of_a_rcpt_gives_the_parsers_address() -> None:
    """The everyday path is taken without the split and the full parser: the same Address either way."""
    paths = [b"<c@d.example>", b"  <c.e@d-f.example>  ", b"<c@d.example> NOTIFY=NEVER", b"<\"c d\"@d.example>",
             b"<Postmaster>", b"<c..e@d.example>", b"<c@-d.example>"]
    session = run([greeted(b"MAIL FROM:<a@b.example>", *(b"RCPT TO:" + path for path in paths))])
    requested = [event.recipient for event in session.events if isinstance(event, RcptRequested)]
    expected = [Address("c", "d.example"), Address("c.e", "d-f.example"), Address("c d", "d.example"),
                Address("Postmaster", session.conn.settings.hostname)]
    assert requested == expected and [str(a) for a in requested[:3]] == ["c@d.example", "c.e@d-f.example",
                                                                         '"c d"@d.example']
    assert [reply.code for reply in session.replies[-7:]] == [250, 250, replies.UNKNOWN_RCPT_PARAMETER.code, 250,
                                                              250, 501, 501]


def test_message_flags_follow_mail_parameters() -> None:
    body = "Subject: caf\u00e9\r\n\r\n\u00fcber\r\n".encode()
    chunk = greeted(b"MAIL FROM:<a@b.example> BODY=8BITMIME SMTPUTF8", b"RCPT TO:<c@d.example>", b"DATA")
    session = run([chunk + body + b".\r\n"])
    (message,) = session.messages
    assert message.body_8bit and message.smtputf8
    assert message.data == body


def test_8bit_data_without_body_parameter_is_flagged() -> None:
    (message,) = run([transaction(b"\xff\xfe\r\n")]).messages
    assert message.body_8bit and not message.smtputf8


def test_multiple_recipients_and_two_transactions() -> None:
    chunk = (
        greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>", b"RCPT TO:<e@f.example>", b"DATA")
        + b"one\r\n.\r\nMAIL FROM:<x@y.example>\r\nRCPT TO:<z@w.example>\r\nDATA\r\ntwo\r\n.\r\n"
    )
    session = run([chunk])
    first, second = session.messages
    assert first.recipients == (Address("c", "d.example"), Address("e", "f.example"))
    assert first.data == b"one\r\n"
    assert second.sender == Address("x", "y.example")
    assert second.data == b"two\r\n"


def test_empty_message() -> None:
    (message,) = run([transaction(b"")]).messages
    assert message.data == b""


# --- decisions: Paused, respond() semantics ---


def test_paused_until_respond_and_input_is_buffered_meanwhile() -> None:
    conn = ServerConnection(server_settings())
    conn.start()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nNOOP\r\n")
    event = conn.next_event()
    assert isinstance(event, MailRequested)
    assert conn.next_event() is Paused
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is Paused
    before = conn.data_to_send()
    assert b"250 2.0.0 OK" not in before  # NOOP not answered before MAIL
    conn.respond(replies.SENDER_OK)
    assert conn.next_event() is NeedData
    assert conn.data_to_send() == (replies.SENDER_OK.to_bytes() + replies.OK.to_bytes() * 2)


def test_respond_without_pending_decision_is_a_usage_error() -> None:
    conn = ServerConnection(server_settings())
    with pytest.raises(ProtocolUsageError):
        conn.respond(replies.OK)


def refuse(kind: type[Event], reply: Reply) -> Decider:
    """A decider that answers `reply` to events of `kind` and accepts everything else."""

    def decide(event: Event) -> Reply:
        return reply if isinstance(event, kind) else accept_all(event)

    return decide


def test_refused_mail_leaves_no_transaction() -> None:
    denied = Reply.of(550, "5.7.1", "sender denied")
    session = run([greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>")], decide=refuse(MailRequested, denied))
    assert session.replies[-2:] == [denied, replies.NEED_MAIL_BEFORE_RCPT]


def test_refused_rcpt_is_not_added_and_data_gets_no_valid_recipients() -> None:
    denied = Reply.of(554, "5.7.1", "relay denied")
    chunk = greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>", b"DATA")
    session = run([chunk], decide=refuse(RcptRequested, denied))
    assert session.replies[-2:] == [denied, replies.NO_VALID_RECIPIENTS]


def test_refused_message_resets_transaction() -> None:
    failed = Reply.of(451, "4.3.0", "try later")
    session = run([transaction() + b"RCPT TO:<c@d.example>\r\n"], decide=refuse(MessageReceived, failed))
    assert session.replies[-2:] == [failed, replies.NEED_MAIL_BEFORE_RCPT]


def test_accepted_message_resets_transaction() -> None:
    session = run([transaction() + b"RCPT TO:<c@d.example>\r\n"])
    assert session.replies[-2:] == [QUEUED, replies.NEED_MAIL_BEFORE_RCPT]


# --- sequence errors ---


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (b"MAIL FROM:<a@b.example>\r\n", replies.NEED_HELO),
        (b"RCPT TO:<a@b.example>\r\n", replies.NEED_HELO),
        (b"DATA\r\n", replies.NEED_HELO),
        (b"EHLO c\r\nRCPT TO:<a@b.example>\r\n", replies.NEED_MAIL_BEFORE_RCPT),
        (b"EHLO c\r\nDATA\r\n", replies.NEED_MAIL_BEFORE_DATA),
        (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n", replies.NO_VALID_RECIPIENTS),
        (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n", replies.NESTED_MAIL),
        (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<a@b.example>\r\n", replies.NEED_MAIL_BEFORE_RCPT),
        (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nEHLO c\r\nRCPT TO:<a@b.example>\r\n", replies.NEED_MAIL_BEFORE_RCPT),
    ],
)
def test_out_of_sequence_commands(lines: bytes, expected: Reply) -> None:
    assert run([lines]).replies[-1] == expected


def test_rset_then_new_mail_is_accepted() -> None:
    session = run([greeted(b"MAIL FROM:<a@b.example>", b"RSET", b"MAIL FROM:<c@d.example>")])
    assert session.replies[-3:] == [replies.SENDER_OK, replies.RESET_OK, replies.SENDER_OK]


# --- other commands ---


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"NOOP", replies.OK),
        (b"NOOP anything", replies.OK),
        (b"HELP", replies.HELP),
        (b"VRFY bob", replies.CANNOT_VRFY),
        (b"VRFY", replies.VRFY_SYNTAX),
        (b"EXPN list", replies.EXPN_NOT_AVAILABLE),
        (b"RSET", replies.RESET_OK),
        (b"RSET now", replies.NO_ARGUMENTS_ALLOWED),
        (b"QUIT now", replies.NO_ARGUMENTS_ALLOWED),
        (b"BDAT 10 LAST", replies.UNKNOWN_COMMAND),
        (b"STARTTLS", replies.UNKNOWN_COMMAND),
        (b"", replies.UNKNOWN_COMMAND),
        (b"MAIL TO:<a@b.example>", replies.MAIL_SYNTAX),
        (b"MAIL", replies.MAIL_SYNTAX),
        (b"MAIL FROM:<a@b.example>\r\nRCPT FROM:<a@b.example>", replies.RCPT_SYNTAX),
        (b"MAIL FROM:<a@b.example>\r\nDATA now", replies.NO_ARGUMENTS_ALLOWED),
        (b"MAIL FROM:a@b.example", replies.bad_sender("the address must be enclosed in <angle brackets>")),
        (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<nobody>", replies.bad_recipient("missing '@domain'")),
        (b"\xff\xfe", replies.COMMAND_NOT_UTF8),
    ],
)
def test_single_command_replies(line: bytes, expected: Reply) -> None:
    assert run([greeted(line)]).replies[-1] == expected


def test_quit_ends_session_and_later_commands_are_ignored() -> None:
    session = run([b"EHLO c\r\nQUIT\r\nNOOP\r\nMAIL FROM:<a@b.example>\r\n", b"NOOP\r\n"])
    assert session.replies[-1] == replies.BYE
    assert session.events == [SessionEnded("quit")]
    assert session.conn.closed


def test_vrfy_and_helo_before_ehlo_work() -> None:
    assert run([b"VRFY x\r\n"]).replies[-1] == replies.CANNOT_VRFY


# --- parameters ---


@pytest.mark.parametrize(
    ("mail", "expected"),
    [
        (b"MAIL FROM:<a@b.example> SIZE=abc", replies.SIZE_SYNTAX),
        (b"MAIL FROM:<a@b.example> SIZE=-1", replies.SIZE_SYNTAX),
        (b"MAIL FROM:<a@b.example> SIZE", replies.SIZE_SYNTAX),
        (b"MAIL FROM:<a@b.example> SIZE=26214401", replies.MESSAGE_SIZE_EXCEEDS_LIMIT),
        (b"MAIL FROM:<a@b.example> BODY=BINARYMIME", replies.BODY_SYNTAX),
        (b"MAIL FROM:<a@b.example> SMTPUTF8=yes", replies.SMTPUTF8_SYNTAX),
        (b"MAIL FROM:<a@b.example> AUTH=<>", replies.UNKNOWN_MAIL_PARAMETER),
        (b"MAIL FROM:<a@b.example> RET=HDRS", replies.UNKNOWN_MAIL_PARAMETER),
        (b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2", replies.DUPLICATE_PARAMETER),
        (b"MAIL FROM:<a@b.example> =x", replies.PARAMETER_SYNTAX),
        (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example> NOTIFY=NEVER", replies.UNKNOWN_RCPT_PARAMETER),
        (b"MAIL FROM:<\xc3\xa9@b.example>", replies.UTF8_NEEDS_SMTPUTF8),
        (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@b\xc3\xbccher.example>", replies.UTF8_NEEDS_SMTPUTF8),
    ],
)
def test_parameter_refusals(mail: bytes, expected: Reply) -> None:
    assert run([greeted(mail)]).replies[-1] == expected


def test_size_exactly_at_limit_is_accepted() -> None:
    settings = server_settings(max_message_size=1000)
    session = run([greeted(b"MAIL FROM:<a@b.example> size=1000")], settings)
    assert session.replies[-1] == replies.SENDER_OK
    assert session.events == [MailRequested(Address("a", "b.example"), {"SIZE": "1000"}, 1000)]


def test_utf8_addresses_with_smtputf8() -> None:
    chunk = greeted(
        "MAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8".encode(),
        "RCPT TO:<\u00e9@caf\u00e9.example>".encode(),
    )
    session = run([chunk])
    mail, rcpt = session.events
    assert isinstance(mail, MailRequested) and mail.sender == Address("j\u00f6rg", "b\u00fccher.example")
    assert isinstance(rcpt, RcptRequested) and rcpt.recipient.ascii_domain == "xn--caf-dma.example"


# --- line framing in command mode ---


@pytest.mark.parametrize(
    "line",
    [b"NOOP\nNOOP", b"NOOP\rNOOP", b"NO\x00OP", b"EHLO c\n", b"\n", b"\r"],
)
def test_bare_cr_lf_or_nul_in_command_line_is_refused_and_not_executed(line: bytes) -> None:
    session = run([b"EHLO c\r\n" + line + b"\r\n"])
    assert session.replies[-1] == replies.BARE_LINE_ENDING_IN_COMMAND
    assert len(session.replies) == 3


def test_bare_lf_does_not_end_a_command() -> None:
    session = run([b"EHLO c\nQUIT\n"])
    assert session.replies == [GREETING]
    assert not session.conn.closed


def test_command_line_at_limit_is_accepted_and_over_limit_refused() -> None:
    settings = server_settings(max_command_line=20)
    exact = b"NOOP " + b"x" * 13 + b"\r\n"  # 20 octets with CRLF
    assert len(exact) == 20
    session = run([b"EHLO c\r\n", exact, b"NOOP " + b"x" * 14 + b"\r\n", b"NOOP\r\n"], settings)
    assert session.replies[-3:] == [replies.OK, replies.COMMAND_TOO_LONG, replies.OK]


@pytest.mark.parametrize("chunking", ["one", "bytes"])
def test_very_long_command_line_is_discarded_up_to_crlf(chunking: str) -> None:
    data = b"EHLO c\r\nNOOP " + b"y" * 5000 + b"\rz\r\nNOOP\r\n"
    chunks = [data] if chunking == "one" else [data[i : i + 1] for i in range(len(data))]
    session = run(chunks)
    assert session.replies[-2:] == [replies.COMMAND_TOO_LONG, replies.OK]
    assert len(session.conn._input) == 0  # nothing left buffered


def test_long_line_buffer_stays_bounded() -> None:
    session = make_session()
    for _ in range(100):
        session.feed(b"x" * 1000)
    assert len(session.conn._input) < 1000


# --- DATA ---


def test_dot_unstuffing() -> None:
    body = b"..\r\n...x\r\n. \r\nmid.dle\r\n..leading\r\n"
    (message,) = run([transaction(body)]).messages
    assert message.data == b".\r\n..x\r\n \r\nmid.dle\r\n.leading\r\n"


def test_data_is_byte_identical_otherwise() -> None:
    body = bytes(range(1, 10)) + bytes(range(14, 256)) + b"\r\n\r\n\t \r\n"
    (message,) = run([transaction(body)]).messages
    assert message.data == body


def test_data_timeout_kind_and_timeout() -> None:
    session = run([greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>")])
    assert session.conn.current_timeout_kind == "command"
    session.feed(b"DATA\r\npartial")
    assert session.conn.current_timeout_kind == "data"
    session.conn.timed_out()
    session.pump()
    assert session.replies[-1] == replies.TIMEOUT
    assert session.events[-1] == SessionEnded("timeout")
    assert session.messages == []
    assert session.conn.closed


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"a\nb\r\n", replies.BARE_LINE_ENDING_IN_DATA),
        (b"a\rb\r\n", replies.BARE_LINE_ENDING_IN_DATA),
        (b"a\x00b\r\n", replies.BARE_LINE_ENDING_IN_DATA),
        (b"x" * 999 + b"\r\n", replies.TEXT_LINE_TOO_LONG),
        (b"." + b"x" * 998 + b"\r\n", replies.TEXT_LINE_TOO_LONG),  # the stuffed dot counts on the wire
    ],
)
def test_data_refusals_consume_to_the_terminator(body: bytes, expected: Reply) -> None:
    session = run([transaction(body) + b"NOOP\r\n"])
    assert session.replies[-2:] == [expected, replies.OK]
    assert session.messages == []


def test_text_line_exactly_at_limit_is_accepted() -> None:
    (message,) = run([transaction(b"x" * 998 + b"\r\n")]).messages
    assert len(message.data) == 1000


def test_oversized_message_is_refused_without_buffering() -> None:
    settings = server_settings(max_message_size=10_000)
    session = make_session(settings)
    session.feed(greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>", b"DATA"))
    for _ in range(200):
        session.feed(b"y" * 100 + b"\r\n")
    reader = session.conn._data_reader
    assert reader is not None and reader._pieces == []
    session.feed(b".\r\nNOOP\r\n")
    assert session.replies[-2:] == [replies.MESSAGE_TOO_BIG, replies.OK]
    assert session.messages == []


def test_message_exactly_at_size_limit_is_accepted() -> None:
    settings = server_settings(max_message_size=12)
    (message,) = run([transaction(b"0123456789\r\n")], settings).messages
    assert message.data == b"0123456789\r\n"


def test_after_refused_data_the_session_continues() -> None:
    session = run([transaction(b"bad\nline\r\n") + transaction()[len(greeted()) :]])
    assert len(session.messages) == 1
    assert replies.BARE_LINE_ENDING_IN_DATA in session.replies


# --- pipelining (RFC 2920) ---


def test_pipelined_replies_come_in_command_order() -> None:
    denied = Reply.of(550, "5.1.1", "no such user")

    def decide(event: Event) -> Reply:
        if isinstance(event, RcptRequested) and event.recipient.local_part == "nobody":
            return denied
        return accept_all(event)

    chunk = (
        greeted(
            b"MAIL FROM:<a@b.example>",
            b"RCPT TO:<nobody@d.example>",
            b"NOOP",
            b"RCPT TO:<c@d.example>",
            b"DATA",
        )
        + b"body\r\n.\r\nQUIT\r\n"
    )
    session = run([chunk], decide=decide)
    assert session.replies[2:] == [
        replies.SENDER_OK,
        denied,
        replies.OK,
        replies.RECIPIENT_OK,
        replies.START_DATA,
        QUEUED,
        replies.BYE,
    ]
    assert session.messages[0].recipients == (Address("c", "d.example"),)


def test_354_is_queued_only_after_earlier_replies() -> None:
    conn = ServerConnection(server_settings())
    conn.start()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    assert isinstance(conn.next_event(), MailRequested)
    assert b"354" not in conn.data_to_send()
    conn.respond(replies.SENDER_OK)
    assert isinstance(conn.next_event(), RcptRequested)
    assert conn.data_to_send() == replies.SENDER_OK.to_bytes()
    conn.respond(replies.RECIPIENT_OK)
    assert conn.next_event() is NeedData
    assert conn.data_to_send() == replies.RECIPIENT_OK.to_bytes() + replies.START_DATA.to_bytes()


def test_after_failed_data_the_body_is_read_as_commands() -> None:
    chunk = greeted(b"MAIL FROM:<a@b.example>", b"DATA") + b"hello\r\n.\r\n"
    session = run([chunk])
    assert session.replies[-3:] == [replies.NO_VALID_RECIPIENTS, replies.UNKNOWN_COMMAND, replies.UNKNOWN_COMMAND]
    assert session.messages == []


# --- limits and errors ---


def test_recipient_limit() -> None:
    settings = server_settings(max_recipients=3)
    rcpts = [b"RCPT TO:<r%d@d.example>" % i for i in range(5)]
    session = run([greeted(b"MAIL FROM:<a@b.example>", *rcpts, b"DATA") + b"x\r\n.\r\n"], settings)
    assert session.replies[-4:-1] == [replies.TOO_MANY_RECIPIENTS, replies.TOO_MANY_RECIPIENTS, replies.START_DATA]
    assert len(session.messages[0].recipients) == 3


def test_too_many_errors_closes_with_421() -> None:
    settings = server_settings(max_errors=3)
    session = run([b"EHLO c\r\nBAD\r\nBAD\r\nBAD\r\nNOOP\r\n"], settings)
    assert session.replies[-4:] == [
        replies.UNKNOWN_COMMAND,
        replies.UNKNOWN_COMMAND,
        replies.UNKNOWN_COMMAND,
        replies.TOO_MANY_ERRORS,
    ]
    assert session.events == [SessionEnded("too many errors")]
    assert session.conn.closed


def test_glue_refusals_of_recipients_count_as_errors() -> None:
    settings = server_settings(max_errors=2)
    denied = Reply.of(550, "5.1.1", "no such user")
    chunk = greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@d.example>", b"RCPT TO:<y@d.example>")
    session = run([chunk], settings, decide=refuse(RcptRequested, denied))
    assert session.replies[-1] == replies.TOO_MANY_ERRORS


def test_successful_commands_do_not_count_as_errors() -> None:
    settings = server_settings(max_errors=2)
    session = run([b"EHLO c\r\n" + b"NOOP\r\n" * 50 + b"BAD\r\nNOOP\r\n"], settings)
    assert not session.conn.closed


# --- EOF ---


def test_eof_in_command_mode() -> None:
    session = run([b"EHLO client.example\r\nNOOP", b""])
    assert session.events == [SessionEnded("client closed the connection")]
    assert session.conn.closed
    assert session.replies[-1] == EHLO


def test_eof_during_data_never_emits_the_partial_message() -> None:
    session = run([greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>", b"DATA") + b"partial\r\n", b""])
    assert session.messages == []
    assert session.events[-1] == SessionEnded("client closed the connection during DATA")


def test_eof_while_paused_processes_buffered_input_first() -> None:
    conn = ServerConnection(server_settings())
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nNOOP\r\n")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), MailRequested)
    conn.respond(replies.SENDER_OK)
    assert conn.next_event() == SessionEnded("client closed the connection")
    assert conn.data_to_send().endswith(replies.OK.to_bytes())
    assert conn.next_event() is NeedData


def test_input_after_close_is_ignored() -> None:
    conn = ServerConnection(server_settings())
    conn.timed_out()
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() == SessionEnded("timeout")
    assert conn.next_event() is NeedData
    assert conn.data_to_send() == replies.TIMEOUT.to_bytes()
    conn.timed_out()
    assert conn.data_to_send() == b""


# --- hooks for the glue: extension commands (STARTTLS, AUTH), observer, timeouts while paused ---

TLS_AUTH = server_settings(
    extra_extensions=("STARTTLS", "AUTH PLAIN"),
    extension_commands=frozenset({"STARTTLS", "AUTH"}),
    max_errors=5,
)


def test_extension_command_is_a_decision_event() -> None:
    conn = ServerConnection(TLS_AUTH)
    conn.receive_data(b"EHLO c\r\nauth PLAIN AGFiYwBzZWNyZXQ=\r\nNOOP\r\n")
    assert conn.next_event() == ExtensionCommand("AUTH", "PLAIN AGFiYwBzZWNyZXQ=")
    assert conn.next_event() is Paused
    ok = Reply.of(235, "2.7.0", "Authentication successful")
    conn.respond(ok)
    assert conn.next_event() is NeedData
    assert conn.data_to_send().endswith(ok.to_bytes() + replies.OK.to_bytes())


def test_334_makes_the_next_line_a_continuation_even_if_long() -> None:
    conn = ServerConnection(TLS_AUTH)
    long_response = b"A" * 4000
    conn.receive_data(b"EHLO c\r\nAUTH PLAIN\r\n" + long_response + b"\r\nNOOP\r\n")
    assert conn.next_event() == ExtensionCommand("AUTH", "PLAIN")
    conn.respond(Reply.of(334, "", ""))
    assert conn.next_event() == ExtensionLine("AUTH", long_response)
    failed = Reply.of(535, "5.7.8", "Authentication credentials invalid")
    conn.respond(failed)
    assert conn.next_event() is NeedData
    assert conn.data_to_send().endswith(b"334 \r\n" + failed.to_bytes() + replies.OK.to_bytes())


def test_overlong_continuation_is_reported_as_none_and_command_limit_returns() -> None:
    settings = server_settings(
        extension_commands=frozenset({"AUTH"}), max_continuation_line=300
    )
    conn = ServerConnection(settings)
    # The continuation limit never goes below the command line limit (512 here).
    conn.receive_data(b"EHLO c\r\nAUTH LOGIN\r\n" + b"B" * 600 + b"\r\nNOOP " + b"x" * 600 + b"\r\n")
    assert isinstance(conn.next_event(), ExtensionCommand)
    conn.respond(Reply.of(334, "", "VXNlcm5hbWU6"))
    assert conn.next_event() == ExtensionLine("AUTH", None)
    conn.respond(Reply.of(501, "5.5.2", "Cannot decode response"))
    assert conn.next_event() is NeedData
    assert conn.data_to_send().endswith(replies.COMMAND_TOO_LONG.to_bytes())


def test_starttls_discards_pipelined_plaintext_and_resets_the_session() -> None:
    conn = ServerConnection(TLS_AUTH)
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert isinstance(conn.next_event(), MailRequested)
    conn.respond(replies.SENDER_OK)
    # CVE-2011-0411: commands injected behind STARTTLS must not run after the handshake.
    conn.receive_data(b"STARTTLS\r\nRSET\r\n")
    assert conn.next_event() == ExtensionCommand("STARTTLS", "")
    conn.respond(Reply.of(220, "2.0.0", "Ready to start TLS"))
    assert conn.next_event() is Paused
    conn.data_to_send()
    conn.starttls_completed()
    assert conn.helo_name is None and not conn.esmtp and not conn.in_transaction
    assert conn.next_event() is NeedData
    assert conn.data_to_send() == b""
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\n")
    assert conn.next_event() is NeedData
    assert conn.data_to_send() == replies.NEED_HELO.to_bytes()


def test_starttls_completed_without_starttls_is_a_usage_error() -> None:
    with pytest.raises(ProtocolUsageError):
        ServerConnection(TLS_AUTH).starttls_completed()


def test_refused_extension_commands_count_as_errors() -> None:
    denied = Reply.of(535, "5.7.8", "Authentication credentials invalid")
    session = run([b"EHLO c\r\n" + b"AUTH PLAIN x\r\n" * 5], TLS_AUTH, decide=lambda event: denied)
    assert session.replies[-2:] == [denied, replies.TOO_MANY_ERRORS]


def test_unlisted_extension_verbs_stay_unknown() -> None:
    assert run([b"EHLO c\r\nSTARTTLS\r\n"]).replies[-1] == replies.UNKNOWN_COMMAND


class RecordingObserver:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.replies: list[Reply] = []

    def command(self, verb: str) -> None:
        self.commands.append(verb)

    def reply(self, reply: Reply) -> None:
        self.replies.append(reply)


def test_observer_sees_commands_and_replies() -> None:
    observer = RecordingObserver()
    conn = ServerConnection(TLS_AUTH, observer)
    conn.start()
    conn.receive_data(b"ehlo c\r\nFOO\r\nNOOP\r\nSTARTTLS\r\n")
    assert conn.next_event() == ExtensionCommand("STARTTLS", "")
    assert observer.commands == ["EHLO", "other", "NOOP", "STARTTLS"]
    assert observer.replies[0] == replies.greeting("mx.example.test")
    assert observer.replies[2:] == [replies.UNKNOWN_COMMAND, replies.OK]


def test_esmtp_flag_follows_ehlo_or_helo() -> None:
    assert run([b"EHLO c\r\n"]).conn.esmtp
    assert not run([b"EHLO c\r\nHELO c\r\n"]).conn.esmtp


def test_in_transaction() -> None:
    session = run([greeted(b"MAIL FROM:<a@b.example>")])
    assert session.conn.in_transaction
    session.feed(b"RSET\r\n")
    assert not session.conn.in_transaction


def test_timeout_while_a_decision_is_pending_closes_and_late_respond_is_ignored() -> None:
    conn = ServerConnection(server_settings())
    conn.receive_data(transaction())
    events = [conn.next_event()]
    conn.respond(replies.SENDER_OK)
    events.append(conn.next_event())
    conn.respond(replies.RECIPIENT_OK)
    assert isinstance(conn.next_event(), MessageReceived)
    conn.timed_out()
    assert conn.next_event() == SessionEnded("timeout")
    assert conn.next_event() is NeedData
    conn.respond(QUEUED)
    assert conn.data_to_send().endswith(replies.TIMEOUT.to_bytes())


# --- DATA lines arriving in pieces ---


def open_data(settings: ServerSettings | None = None) -> tuple[ServerConnection, list[Event]]:
    session = run([greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>", b"DATA")], settings)
    return session.conn, session.events


def drain(conn: ServerConnection) -> list[Event]:
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NeedData or event is Paused:
            return events
        assert not isinstance(event, type)
        events.append(event)


def test_overlong_text_line_streamed_in_pieces_is_refused_and_not_buffered() -> None:
    conn, _ = open_data()
    for _ in range(50):
        conn.receive_data(b".\xc3\xa9" + b"z" * 97)  # one 5000-octet line, no CRLF yet
        assert drain(conn) == []
    assert len(conn._input) <= 1000
    conn.receive_data(b"\r\n.\r\n")
    assert drain(conn) == []
    assert conn.data_to_send().endswith(replies.TEXT_LINE_TOO_LONG.to_bytes())


def test_cr_at_a_piece_boundary_is_still_part_of_crlf() -> None:
    settings = server_settings(max_text_line=2000)
    conn, _ = open_data(settings)
    conn.receive_data(b".." + b"q" * 1200 + b"\r")
    assert drain(conn) == []
    conn.receive_data(b"\n\xff\r\n.\r\n")
    (message,) = drain(conn)
    assert isinstance(message, MessageReceived)
    assert message.data == b"." + b"q" * 1200 + b"\r\n\xff\r\n"
    assert message.body_8bit


def test_lone_cr_at_a_piece_boundary_followed_by_text_is_bare() -> None:
    settings = server_settings(max_text_line=2000)
    conn, _ = open_data(settings)
    conn.receive_data(b"q" * 1200 + b"\r")
    conn.receive_data(b"x\r\n.\r\n")
    assert drain(conn) == []
    assert conn.data_to_send().endswith(replies.BARE_LINE_ENDING_IN_DATA.to_bytes())


def test_extra_parameters_are_passed_through_to_the_glue() -> None:
    settings = server_settings(
        extra_mail_parameters=frozenset({"RET", "ENVID"}),
        extra_rcpt_parameters=frozenset({"NOTIFY"}),
    )
    chunk = greeted(b"MAIL FROM:<a@b.example> RET=HDRS ENVID=x1", b"RCPT TO:<c@d.example> NOTIFY=NEVER ORCPT=x")
    session = run([chunk], settings)
    assert session.events[0] == MailRequested(Address("a", "b.example"), {"RET": "HDRS", "ENVID": "x1"}, None)
    assert session.replies[-1] == replies.UNKNOWN_RCPT_PARAMETER
    session.feed(b"RCPT TO:<c@d.example> notify=NEVER\r\n")
    assert session.events[-1] == RcptRequested(Address("c", "d.example"), {"NOTIFY": "NEVER"})


def test_bare_postmaster_recipient_means_the_postmaster_of_this_server() -> None:
    session = run([greeted(b"MAIL FROM:<a@b.example>", b"RCPT TO:<PostMaster>")])
    assert session.events[-1] == RcptRequested(Address("PostMaster", "mx.example.test"), {})


def test_reply_bytes_are_kept_without_changing_equality() -> None:
    reply = Reply(250, "2.0.0", ("first", "second"))
    assert reply.to_bytes() == b"250-2.0.0 first\r\n250 2.0.0 second\r\n"
    assert reply.to_bytes() is reply.to_bytes()  # made once
    twin = Reply(250, "2.0.0", ("first", "second"))
    assert reply == twin and hash(reply) == hash(twin) and repr(reply) == repr(twin)
    assert Reply.of(354, "", "End data with <CR><LF>.<CR><LF>").to_bytes() == (
        b"354 End data with <CR><LF>.<CR><LF>\r\n")
