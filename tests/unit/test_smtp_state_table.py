"""The server machine's state table (`cluster.smtp.server._OUT_OF_SEQUENCE`): every refusal it lists is what a
client gets for that command in that state, and the states follow the commands (RFC 5321 4.1.4, RFC 3030)."""

from __future__ import annotations

import pytest

from cluster.smtp import replies
from cluster.smtp.events import ExtensionCommand, ExtensionLine, NeedData, Paused
from cluster.smtp.server import _OUT_OF_SEQUENCE, COMMAND_STATES, ServerConnection, State
from tests.support.smtp_driver import QUEUED, Session, make_session, server_settings

CHUNKING = server_settings(chunking=True)

# Client input that brings a fresh session to each command state.
TO_STATE = {
    State.CONNECTED: b"",
    State.GREETED: b"EHLO c\r\n",
    State.MAIL: b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n",
    State.RCPT: b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n",
    State.CHUNKING: b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 3\r\nabc",
}
# A well-formed instance of each sequenced command.
COMMAND = {"MAIL": b"MAIL FROM:<x@y.example>\r\n", "RCPT": b"RCPT TO:<x@y.example>\r\n", "DATA": b"DATA\r\n",
           "BDAT": b"BDAT 2 LAST\r\nxy"}


def in_state(state: State) -> Session:
    session = make_session(CHUNKING)
    if TO_STATE[state]:
        session.feed(TO_STATE[state])
    assert session.conn.state is state
    return session


@pytest.mark.parametrize(("verb", "state"), sorted(_OUT_OF_SEQUENCE, key=lambda k: (k[0], k[1].value)))
def test_each_refusal_in_the_table_is_what_the_client_gets(verb: str, state: State) -> None:
    session = in_state(state)
    before = len(session.replies)
    session.feed(COMMAND[verb])
    assert session.replies[before:] == [_OUT_OF_SEQUENCE[(verb, state)]]
    assert session.conn.state is state  # a refused command changes nothing


@pytest.mark.parametrize("state", sorted(COMMAND_STATES, key=lambda s: s.value))
@pytest.mark.parametrize("verb", sorted(COMMAND))
def test_every_pair_outside_the_table_is_accepted(verb: str, state: State) -> None:
    if (verb, state) in _OUT_OF_SEQUENCE:
        return
    session = in_state(state)
    before = len(session.replies)
    session.feed(COMMAND[verb])
    answer = session.replies[before]
    assert answer not in _OUT_OF_SEQUENCE.values()
    assert answer.code < 400, answer


def test_transitions_through_a_transaction() -> None:
    session = make_session(CHUNKING)
    seen = [session.conn.state]
    for line in (b"EHLO c\r\n", b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n",
                 b"BDAT 1\r\nx", b"BDAT 1 LAST\r\ny", b"MAIL FROM:<a@b.example>\r\n", b"RSET\r\n", b"QUIT\r\n"):
        session.feed(line)
        seen.append(session.conn.state)
    assert seen == [State.CONNECTED, State.GREETED, State.MAIL, State.RCPT, State.CHUNKING, State.GREETED,
                    State.MAIL, State.GREETED, State.CLOSED]
    assert session.replies[-4] == QUEUED


def test_data_and_the_states_while_reading_it() -> None:
    session = in_state(State.RCPT)
    session.feed(b"DATA\r\n")
    assert session.conn.state is State.DATA and session.conn.current_timeout_kind == "data"
    session.feed(b"body\r\n.\r\n")
    assert session.conn.state is State.GREETED and session.replies[-1] == QUEUED


def test_a_partial_bdat_chunk_keeps_the_machine_reading_octets() -> None:
    session = in_state(State.RCPT)
    session.feed(b"BDAT 10 LAST\r\nabc")
    assert session.conn.state is State.BDAT and session.conn.current_timeout_kind == "data"
    session.feed(b"defghij")
    assert session.conn.state is State.GREETED


def test_auth_line_and_tls_handshake_states() -> None:
    conn = ServerConnection(server_settings(extension_commands=frozenset({"AUTH", "STARTTLS"})))
    conn.receive_data(b"EHLO c\r\nAUTH PLAIN\r\n")
    assert conn.next_event() == ExtensionCommand("AUTH", "PLAIN")
    conn.respond(replies.auth_challenge(""))
    assert conn.state is State.AUTH_LINE
    conn.receive_data(b"*\r\nSTARTTLS\r\nNOOP\r\n")
    assert conn.next_event() == ExtensionLine("AUTH", b"*")
    conn.respond(replies.AUTH_CANCELLED)
    assert conn.state is State.GREETED  # back where the exchange began
    assert conn.next_event() == ExtensionCommand("STARTTLS", "")
    conn.respond(replies.READY_FOR_TLS)
    assert conn.state is State.TLS_HANDSHAKE
    assert conn.next_event() is Paused  # the pipelined NOOP was dropped, nothing runs until the handshake
    conn.starttls_completed()
    assert conn.state is State.CONNECTED and conn.helo_name is None
    assert conn.next_event() is NeedData
    assert conn.data_to_send().endswith(replies.READY_FOR_TLS.to_bytes())
