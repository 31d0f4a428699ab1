"""The sans-I/O POP3 machine, fed bytes: every command and error, framing, stuffing, deletions only at QUIT."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    ProtocolUsageError,
    SessionEnded,
    StartTlsRequested,
    UpdateRequested,
    dot_stuff,
    normalize_message,
    top_of_message,
)

PASSWORD = "s3cret pass"
MESSAGES = {
    "uid-1": b"Subject: one\r\n\r\nfirst\r\n.dot line\r\n",
    "uid-2": b"Subject: two\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\n",
    "uid-3": b"Subject: bare\n\nlf only\n.\n",
}


@dataclass
class Glue:
    """Answers the machine's decisions like the real glue, from in-memory users and messages."""

    conn: Pop3Connection
    messages: dict[str, bytes] = field(default_factory=lambda: dict(MESSAGES))
    locked: bool = False
    removed: list[str] = field(default_factory=list)
    events: list[object] = field(default_factory=list)

    def feed(self, data: bytes) -> bytes:
        self.conn.receive_data(data)
        self.pump()
        return self.conn.data_to_send()

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NeedData:
                return
            assert event is not Paused
            self.events.append(event)
            if isinstance(event, CredentialsReceived):
                ok = event.username == "alice" and event.password == PASSWORD
                self.conn.credentials_checked(CredentialCheck.OK if ok else CredentialCheck.INVALID)
            elif isinstance(event, MaildropRequested):
                if self.locked:
                    self.conn.maildrop_unavailable(in_use=True)
                else:
                    self.conn.maildrop_opened([MessageInfo(uid, len(normalize_message(body)))
                                               for uid, body in self.messages.items()])
            elif isinstance(event, MessageRequested):
                self.conn.message_loaded(self.messages.get(event.uid))
            elif isinstance(event, UpdateRequested):
                self.removed.extend(event.uids)
                self.conn.update_done(0)
            elif isinstance(event, StartTlsRequested):
                self.conn.tls_established()


def session(*, plaintext: bool = True, tls: bool = False, max_errors: int = 10, max_auth_failures: int = 3) -> Glue:
    conn = Pop3Connection(Pop3Settings(hostname="pop.test", max_errors=max_errors,
                                       max_auth_failures=max_auth_failures, tls_available=tls),
                          plaintext_auth_allowed=plaintext)
    conn.start()
    return Glue(conn)


def logged_in(*, max_errors: int = 10) -> Glue:
    glue = session(max_errors=max_errors)
    glue.conn.data_to_send()
    reply = glue.feed(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert reply.endswith(b"+OK Maildrop locked and ready, 3 messages (" + str(total()).encode() + b" octets)\r\n")
    return glue


def total() -> int:
    return sum(len(normalize_message(m)) for m in MESSAGES.values())


def test_greeting_and_quit_in_authorization() -> None:
    glue = session()
    assert glue.conn.data_to_send() == b"+OK pop.test POP3 server ready\r\n"
    assert glue.feed(b"QUIT\r\n") == b"+OK Bye\r\n"
    assert glue.conn.closed
    assert glue.events == [SessionEnded("quit")]


def test_login_and_stat_list_uidl() -> None:
    glue = logged_in()
    sizes = [len(normalize_message(m)) for m in MESSAGES.values()]
    assert glue.feed(b"STAT\r\n") == f"+OK 3 {sum(sizes)}\r\n".encode()
    assert glue.feed(b"LIST\r\n") == (f"+OK 3 messages ({sum(sizes)} octets)\r\n1 {sizes[0]}\r\n2 {sizes[1]}\r\n"
                                      f"3 {sizes[2]}\r\n.\r\n").encode()
    assert glue.feed(b"LIST 2\r\n") == f"+OK 2 {sizes[1]}\r\n".encode()
    assert glue.feed(b"UIDL\r\n") == b"+OK 3 messages (" + str(sum(sizes)).encode() + \
        b" octets)\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
    assert glue.feed(b"uidl 3\r\n") == b"+OK 3 uid-3\r\n"
    assert glue.feed(b"NOOP\r\n") == b"+OK\r\n"
    assert glue.conn.username == "alice"


def test_retr_is_byte_stuffed_with_crlf_and_exact_size() -> None:
    glue = logged_in()
    assert glue.feed(b"RETR 1\r\n") == (b"+OK 34 octets\r\nSubject: one\r\n\r\nfirst\r\n..dot line\r\n.\r\n")
    assert len(MESSAGES["uid-1"]) == 34
    # Bare LF line ends are sent as CRLF, and the size counts what is sent (before stuffing).
    assert glue.feed(b"RETR 3\r\n") == (b"+OK 29 octets\r\nSubject: bare\r\n\r\nlf only\r\n..\r\n.\r\n")


def test_top() -> None:
    glue = logged_in()
    assert glue.feed(b"TOP 2 0\r\n") == b"+OK Top of message follows\r\nSubject: two\r\nX: y\r\n\r\n.\r\n"
    assert glue.feed(b"TOP 2 2\r\n") == b"+OK Top of message follows\r\nSubject: two\r\nX: y\r\n\r\nl1\r\nl2\r\n.\r\n"
    assert glue.feed(b"TOP 2 99\r\n").endswith(b"l3\r\n.\r\n")
    assert glue.feed(b"TOP 2\r\n") == b"-ERR Syntax error in arguments\r\n"
    assert glue.feed(b"TOP 2 x\r\n") == b"-ERR Syntax error in arguments\r\n"
    assert [e.top_lines for e in glue.events if isinstance(e, MessageRequested)] == [0, 2, 99]


def test_deletions_apply_only_at_quit() -> None:
    glue = logged_in()
    assert glue.feed(b"DELE 1\r\n") == b"+OK Message 1 deleted\r\n"
    assert glue.feed(b"DELE 1\r\n") == b"-ERR Message already deleted\r\n"
    assert glue.feed(b"RETR 1\r\n") == b"-ERR Message already deleted\r\n"
    assert glue.feed(b"LIST 1\r\n") == b"-ERR Message already deleted\r\n"
    assert glue.feed(b"STAT\r\n").startswith(b"+OK 2 ")
    assert b"\r\n1 " not in glue.feed(b"LIST\r\n")
    assert glue.removed == []
    assert glue.feed(b"QUIT\r\n") == b"+OK Bye (2 messages left)\r\n"
    assert glue.removed == ["uid-1"]
    assert glue.conn.closed


def test_rset_unmarks() -> None:
    glue = logged_in()
    glue.feed(b"DELE 2\r\nDELE 3\r\n")
    assert glue.feed(b"RSET\r\n") == f"+OK Maildrop has 3 messages ({total()} octets)\r\n".encode()
    assert glue.feed(b"QUIT\r\n") == b"+OK Bye (3 messages left)\r\n"
    assert glue.removed == []
    assert not any(isinstance(e, UpdateRequested) for e in glue.events)


@pytest.mark.parametrize("ending", [b"", b"QUIT"])
def test_a_dropped_or_timed_out_connection_deletes_nothing(ending: bytes) -> None:
    glue = logged_in()
    glue.feed(b"DELE 1\r\nDELE 2\r\n" + ending)  # QUIT without its CRLF is not a command
    glue.conn.receive_data(b"")
    glue.pump()
    assert glue.conn.closed
    assert glue.removed == []
    assert glue.events[-1] == SessionEnded("client closed the connection")
    timed = logged_in()
    timed.feed(b"DELE 1\r\n")
    timed.conn.timed_out()
    assert timed.conn.data_to_send() == b"-ERR Idle for too long, closing connection\r\n"
    timed.pump()
    assert timed.removed == [] and timed.conn.closed


def test_update_failure_is_reported() -> None:
    glue = logged_in()
    glue.conn.receive_data(b"DELE 1\r\nQUIT\r\n")
    event = glue.conn.next_event()  # DELE is answered by the machine itself: the first event is QUIT's
    assert event == UpdateRequested(("uid-1",))
    assert glue.conn.next_event() is Paused
    glue.conn.update_done(1)
    assert glue.conn.data_to_send().endswith(b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n")
    assert glue.conn.closed


def test_message_numbers_and_syntax() -> None:
    glue = logged_in(max_errors=20)
    for command in (b"RETR 0", b"RETR 4", b"DELE 99", b"LIST 4", b"UIDL 4"):
        assert glue.feed(command + b"\r\n") == b"-ERR No such message\r\n", command
    for command in (b"RETR", b"RETR x", b"RETR -1", b"RETR 1 2", b"LIST 1 2", b"STAT 1", b"DELE",
                    b"RETR 1234567890"):
        assert glue.feed(command + b"\r\n") == b"-ERR Syntax error in arguments\r\n", command


def test_commands_in_the_wrong_state() -> None:
    glue = session()
    glue.conn.data_to_send()
    for command in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"UIDL", b"TOP 1 1"):
        assert glue.feed(command + b"\r\n") == b"-ERR Command not valid in this state\r\n", command
    glue = logged_in()
    for command in (b"USER bob", b"PASS x", b"STLS"):
        assert glue.feed(command + b"\r\n") == b"-ERR Command not valid in this state\r\n", command


def test_unknown_commands_and_pass_without_user() -> None:
    glue = session()
    glue.conn.data_to_send()
    assert glue.feed(b"APOP alice 0123\r\n") == b"-ERR Unknown command\r\n"
    assert glue.feed(b"AUTH PLAIN\r\n") == b"-ERR Unknown command\r\n"
    assert glue.feed(b"\r\n") == b"-ERR Unknown command\r\n"
    assert glue.feed(b"PASS x\r\n") == b"-ERR Send USER first\r\n"
    assert glue.feed(b"USER\r\n") == b"-ERR Syntax error in arguments\r\n"


def test_wrong_password_limit_closes() -> None:
    glue = session(max_auth_failures=3)
    glue.conn.data_to_send()
    assert glue.feed(b"USER alice\r\nPASS wrong\r\n") == b"+OK Send your password\r\n" \
        b"-ERR [AUTH] Invalid user name or password\r\n"
    assert glue.feed(b"USER nobody\r\nPASS x\r\n").endswith(b"-ERR [AUTH] Invalid user name or password\r\n")
    assert glue.feed(b"USER alice\r\nPASS wrong\r\nUSER alice\r\n").endswith(
        b"-ERR [AUTH] Too many failed logins, closing connection\r\n")
    assert glue.conn.closed
    assert not any(isinstance(e, MaildropRequested) for e in glue.events)


def test_password_keeps_spaces_and_never_shows_in_repr() -> None:
    glue = logged_in()
    event = next(e for e in glue.events if isinstance(e, CredentialsReceived))
    assert event.password == PASSWORD
    assert PASSWORD not in repr(event)


def test_maildrop_in_use() -> None:
    glue = session()
    glue.locked = True
    glue.conn.data_to_send()
    reply = glue.feed(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert reply.endswith(b"-ERR [IN-USE] Maildrop is locked by another session\r\n")
    assert glue.conn.state == "authorization" and not glue.conn.closed
    glue.locked = False
    assert glue.feed(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n").endswith(b"octets)\r\n")


def test_users_file_unavailable_is_temporary() -> None:
    conn = Pop3Connection(Pop3Settings(), plaintext_auth_allowed=True)
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn.next_event(), CredentialsReceived)
    conn.credentials_checked(CredentialCheck.UNAVAILABLE)
    assert conn.data_to_send().endswith(b"-ERR [SYS/TEMP] Authentication temporarily unavailable, try again later\r\n")
    assert conn.next_event() is NeedData and not conn.closed


def test_encryption_required_without_tls_off_loopback() -> None:
    glue = session(plaintext=False, tls=True)
    glue.conn.data_to_send()
    assert glue.feed(b"USER alice\r\n") == b"-ERR [AUTH] Encryption required: use STLS first\r\n"
    assert glue.feed(b"PASS x\r\n") == b"-ERR [AUTH] Encryption required: use STLS first\r\n"
    capa = glue.feed(b"CAPA\r\n")
    assert b"\r\nSTLS\r\n" in capa and b"\r\nUSER\r\n" not in capa
    assert glue.feed(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert glue.conn.tls_active
    capa = glue.feed(b"CAPA\r\n")
    assert b"\r\nUSER\r\n" in capa and b"STLS" not in capa
    assert glue.feed(b"STLS\r\n") == b"-ERR TLS already active\r\n"
    assert glue.feed(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n").endswith(b"octets)\r\n")


def test_stls_discards_pipelined_plaintext_and_forgets_user() -> None:
    glue = session(plaintext=True, tls=True)
    glue.conn.data_to_send()
    glue.conn.receive_data(b"USER alice\r\nSTLS\r\nPASS " + PASSWORD.encode() + b"\r\n")
    glue.conn.next_event()
    assert glue.conn.data_to_send() == b"+OK Send your password\r\n+OK Begin TLS negotiation\r\n"
    glue.conn.tls_established()
    assert glue.conn.next_event() is NeedData  # the injected PASS was thrown away
    assert glue.feed(b"PASS " + PASSWORD.encode() + b"\r\n") == b"-ERR Send USER first\r\n"


def test_stls_unavailable_and_syntax() -> None:
    glue = session(tls=False)
    glue.conn.data_to_send()
    assert glue.feed(b"STLS\r\n") == b"-ERR STLS not available\r\n"
    assert b"STLS" not in glue.feed(b"CAPA\r\n")
    assert session(tls=True).feed(b"STLS now\r\n").endswith(b"-ERR Syntax error in arguments\r\n")


def test_capa_lists_resp_codes() -> None:
    glue = session()
    glue.conn.data_to_send()
    assert glue.feed(b"CAPA\r\n") == (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
                                      b"AUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\nIMPLEMENTATION mtacluster\r\n.\r\n")
    glue = logged_in()
    assert b"USER" not in glue.feed(b"CAPA\r\n")


def test_line_limit_255_octets() -> None:
    glue = session()
    glue.conn.data_to_send()
    assert glue.feed(b"NOOP " + b"x" * 248 + b"\r\n") == b"-ERR Command not valid in this state\r\n"  # 255
    assert glue.feed(b"NOOP " + b"x" * 249 + b"\r\n") == b"-ERR Command line too long\r\n"  # 256
    assert glue.feed(b"USER " + b"a" * 5000 + b"\r\nQUIT\r\n") == b"-ERR Command line too long\r\n+OK Bye\r\n"


@pytest.mark.parametrize("line", [b"NOOP\nQUIT", b"QU\rIT", b"QUIT\x00", b"US\xffER a"])
def test_only_crlf_ends_a_line(line: bytes) -> None:
    glue = logged_in()
    assert glue.feed(line + b"\r\n") == b"-ERR Invalid characters in command line\r\n"
    assert not glue.conn.closed


def test_error_limit_closes_without_update() -> None:
    glue = logged_in(max_errors=3)
    glue.feed(b"DELE 1\r\n")
    reply = glue.feed(b"BAD\r\nBAD\r\nBAD\r\nNOOP\r\n")
    assert reply == b"-ERR Unknown command\r\n" * 3 + b"-ERR Too many errors, closing connection\r\n"
    assert glue.conn.closed and glue.removed == []
    assert glue.events[-1] == SessionEnded("too many errors")


def test_commands_are_case_insensitive_and_pipelined() -> None:
    glue = session()
    glue.conn.data_to_send()
    reply = glue.feed(b"user alice\r\npass " + PASSWORD.encode() + b"\r\nstat\r\nquit\r\n")
    assert reply.count(b"+OK") == 4 and reply.endswith(b"+OK Bye (3 messages left)\r\n")


def test_retr_of_a_vanished_message() -> None:
    glue = logged_in()
    del glue.messages["uid-2"]
    assert glue.feed(b"RETR 2\r\n") == b"-ERR [SYS/TEMP] Message cannot be read now\r\n"


def test_glue_misuse_raises() -> None:
    conn = Pop3Connection(Pop3Settings(), plaintext_auth_allowed=True)
    with pytest.raises(ProtocolUsageError):
        conn.message_loaded(b"x")
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn.next_event(), CredentialsReceived)
    assert conn.next_event() is Paused
    with pytest.raises(ProtocolUsageError):
        conn.maildrop_opened([])


def test_input_after_close_is_ignored() -> None:
    glue = session()
    glue.feed(b"QUIT\r\n")
    assert glue.feed(b"USER x\r\n") == b""


def test_helpers() -> None:
    assert normalize_message(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert normalize_message(b"") == b""
    assert dot_stuff(b".a\r\nb\r\n..c\r\n") == b"..a\r\nb\r\n...c\r\n"
    assert top_of_message(b"H: 1\r\nH: 2\r\n", 5) == b"H: 1\r\nH: 2\r\n"
    assert top_of_message(b"\r\nbody\r\n", 0) == b"\r\n"


SCRIPT_COMMANDS = [b"USER alice", b"PASS " + PASSWORD.encode(), b"PASS wrong", b"USER bob", b"STAT", b"LIST",
                   b"LIST 2", b"UIDL", b"RETR 1", b"RETR 3", b"TOP 2 1", b"DELE 1", b"RSET", b"NOOP", b"CAPA",
                   b"BOGUS", b"RETR 9", b"QUIT", b"x" * 300]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(SCRIPT_COMMANDS), max_size=25), st.data())
def test_byte_by_byte_equals_one_chunk(commands: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(c + b"\r\n" for c in [b"USER alice", b"PASS " + PASSWORD.encode(), *commands])
    whole = session()
    whole_out = whole.conn.data_to_send() + whole.feed(stream)
    pieces = session()
    pieces_out = pieces.conn.data_to_send()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    start = 0
    for cut in [*cuts, len(stream)]:
        pieces_out += pieces.feed(stream[start:cut]) if cut > start else b""
        start = cut
    one_by_one = session()
    one_out = one_by_one.conn.data_to_send()
    for index in range(len(stream)):
        one_out += one_by_one.feed(stream[index:index + 1])
    assert pieces_out == whole_out == one_out
    assert pieces.removed == whole.removed == one_by_one.removed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises(garbage: bytes) -> None:
    glue = logged_in()
    glue.feed(garbage)
    glue.conn.receive_data(b"")
    glue.pump()
    assert glue.conn.closed
    assert glue.removed == [] or b"QUIT\r\n" in garbage.upper()
