"""SMTP AUTH PLAIN and LOGIN as pure logic (cluster.frontend.auth), plus the RFC 3848 protocol names."""

from __future__ import annotations

import asyncio
import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.frontend import auth
from cluster.frontend.auth import SmtpAuth, Verify
from cluster.frontend.received import protocol_name
from cluster.smtp import replies
from cluster.smtp.replies import Reply
from cluster.tls import discard_buffered_input


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def ready(max_failures: int = 3) -> SmtpAuth:
    return SmtpAuth(max_failures)


def command(state: SmtpAuth, argument: str, *, tls: bool = True, greeted: bool = True,
            in_transaction: bool = False) -> auth.Step:
    return state.command(argument, tls=tls, greeted=greeted, in_transaction=in_transaction)


def test_plain_with_initial_response_asks_to_verify_then_succeeds() -> None:
    state = ready()
    step = command(state, "PLAIN " + b64(b"\0alice@example.org\0s3cret"))
    assert step == Verify("alice@example.org", "s3cret")
    assert state.verified(True) == replies.AUTH_SUCCEEDED
    assert state.user == "alice@example.org" and state.failures == 0


def test_plain_without_initial_response_sends_an_empty_challenge() -> None:
    state = ready()
    challenge = command(state, "plain")
    assert challenge == Reply.of(334, "", "") and challenge.to_bytes() == b"334\r\n"
    assert state.in_exchange
    assert state.line(b64(b"alice\0alice\0pw").encode()) == Verify("alice", "pw")


def test_login_asks_for_username_then_password() -> None:
    state = ready()
    assert command(state, "LOGIN") == Reply.of(334, "", "VXNlcm5hbWU6")
    assert state.line(b64(b"bob").encode()) == Reply.of(334, "", "UGFzc3dvcmQ6")
    assert state.line(b64(b"hunter2").encode()) == Verify("bob", "hunter2")


def test_login_with_the_username_as_initial_response() -> None:
    state = ready()
    assert command(state, "LOGIN " + b64(b"bob")) == Reply.of(334, "", "UGFzc3dvcmQ6")
    assert state.line(b64(b"pw").encode()) == Verify("bob", "pw")


def test_the_password_is_not_in_the_repr() -> None:
    assert "s3cret" not in repr(Verify("alice", "s3cret"))


def test_wrong_password_is_535_and_counts() -> None:
    state = ready()
    assert isinstance(command(state, "PLAIN " + b64(b"\0alice\0wrong")), Verify)
    assert state.verified(False) == replies.AUTH_INVALID_CREDENTIALS
    assert state.user is None and state.failures == 1 and not state.in_exchange


def test_cancel_with_star() -> None:
    state = ready()
    command(state, "LOGIN")
    assert state.line(b"*") == replies.AUTH_CANCELLED
    assert state.failures == 1 and not state.in_exchange


@pytest.mark.parametrize("response", ["not-base64!", "YWJj=ZGVm", "é"])
def test_malformed_base64_is_501_5_5_2(response: str) -> None:
    state = ready()
    assert command(state, "PLAIN " + response) == replies.AUTH_CANNOT_DECODE
    command(state, "PLAIN")
    assert state.line(response.encode()) == replies.AUTH_CANNOT_DECODE
    assert state.failures == 2


@pytest.mark.parametrize("message", [b"alice\0pw", b"\0\0pw", b"\0alice\0", b"\0a\0b\0c", b"\0\xff\0pw",
                                     b"\0" + b"a" * 256 + b"\0pw"])
def test_malformed_plain_messages_are_refused(message: bytes) -> None:
    assert command(ready(), "PLAIN " + b64(message)) == replies.AUTH_CANNOT_DECODE


def test_authzid_equal_to_authcid_is_accepted_any_other_is_refused_without_verifying() -> None:
    assert command(ready(), "PLAIN " + b64(b"Alice\0alice\0pw")) == Verify("alice", "pw")
    state = ready()
    assert command(state, "PLAIN " + b64(b"root\0alice\0pw")) == replies.AUTH_INVALID_CREDENTIALS
    assert state.failures == 1


def test_empty_initial_response_is_an_equals_sign() -> None:
    # RFC 4954 4: "=" is an empty initial response; an empty PLAIN message is malformed.
    assert command(ready(), "PLAIN =") == replies.AUTH_CANNOT_DECODE


def test_overlong_line_is_500_5_5_6() -> None:
    state = ready()
    command(state, "PLAIN")
    assert state.line(None) == replies.AUTH_LINE_TOO_LONG


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"tls": False}, replies.AUTH_ENCRYPTION_REQUIRED), ({"greeted": False}, replies.AUTH_NEED_EHLO),
     ({"in_transaction": True}, replies.AUTH_NOT_IN_TRANSACTION)],
)
def test_auth_is_refused_without_tls_before_ehlo_and_during_a_transaction(kwargs: dict[str, bool],
                                                                          expected: Reply) -> None:
    state = ready()
    assert state.command("PLAIN " + b64(b"\0a\0b"), **{"tls": True, "greeted": True, "in_transaction": False,
                                                       **kwargs}) == expected
    assert state.failures == 0 and not state.in_exchange


def test_encryption_required_code() -> None:
    assert (replies.AUTH_ENCRYPTION_REQUIRED.code, replies.AUTH_ENCRYPTION_REQUIRED.enhanced) == (538, "5.7.11")


def test_auth_twice_is_503() -> None:
    state = ready()
    command(state, "PLAIN " + b64(b"\0a\0b"))
    state.verified(True)
    assert command(state, "PLAIN " + b64(b"\0a\0b")) == replies.AUTH_ALREADY_AUTHENTICATED


@pytest.mark.parametrize(("argument", "expected"), [("CRAM-MD5", replies.AUTH_UNKNOWN_MECHANISM),
                                                    ("", replies.AUTH_SYNTAX), ("PLAIN a b", replies.AUTH_SYNTAX)])
def test_unknown_mechanism_and_syntax(argument: str, expected: Reply) -> None:
    assert command(ready(), argument) == expected


@given(mechanism=st.sampled_from(["PLAIN", "LOGIN"]), lines=st.lists(st.binary(max_size=64), max_size=3),
       argument=st.text(max_size=40))
def test_any_input_gives_a_reply_or_credentials_never_an_exception(mechanism: str, lines: list[bytes],
                                                                   argument: str) -> None:
    state = ready(max_failures=100)
    step = command(state, f"{mechanism} {argument}".rstrip())
    assert isinstance(step, Reply | Verify)
    for line in lines:
        if not state.in_exchange:
            break
        step = state.line(line)
        assert isinstance(step, Reply | Verify)
    if isinstance(step, Verify):
        assert state.verified(False) == replies.AUTH_INVALID_CREDENTIALS
    assert state.user is None


def test_exhausted_after_max_failures() -> None:
    state = ready(max_failures=2)
    for _ in range(2):
        assert not state.exhausted
        command(state, "PLAIN " + b64(b"\0a\0b"))
        state.verified(False)
    assert state.exhausted


def test_temporary_failure_is_454_and_not_counted() -> None:
    state = ready()
    command(state, "PLAIN " + b64(b"\0a\0b"))
    assert state.temporary_failure() == replies.AUTH_TEMPORARY_FAILURE
    assert state.failures == 0 and state.user is None


@pytest.mark.parametrize(
    ("esmtp", "smtputf8", "tls", "authenticated", "expected"),
    [(False, False, False, False, "SMTP"), (True, False, False, False, "ESMTP"), (True, False, True, False, "ESMTPS"),
     (True, False, False, True, "ESMTPA"), (True, False, True, True, "ESMTPSA"), (True, True, True, True, "UTF8SMTPSA"),
     (False, False, True, False, "SMTP")],
)
def test_protocol_names_follow_rfc_3848(esmtp: bool, smtputf8: bool, tls: bool, authenticated: bool,
                                        expected: str) -> None:
    assert protocol_name(esmtp=esmtp, smtputf8=smtputf8, tls=tls, authenticated=authenticated) == expected


async def test_plaintext_buffered_before_the_tls_handshake_is_dropped() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"RSET\r\nMAIL FROM:<evil@example.test>\r\n")
    assert discard_buffered_input(reader) == 37
    assert discard_buffered_input(reader) == 0
    reader.feed_data(b"EHLO c\r\n")
    reader.feed_eof()
    assert await reader.read() == b"EHLO c\r\n"
