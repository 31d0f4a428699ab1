"""SMTP smuggling (CVE-2023-51764 and friends): a lone "." behind a non-CRLF line ending must never end DATA.

Each vector is embedded in a message body followed by a complete smuggled transaction. Whatever the chunking,
the session must yield exactly one outcome for the outer message (here: a 550 5.6.0 refusal, since the body
holds a bare CR, LF or NUL) and never a second message.
"""

from __future__ import annotations

import pytest

from cluster.smtp import replies
from tests.support.smtp_driver import Session, greeted, run

VECTORS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\r",
    b"\r\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.\r\x00\n",
    b"\r\n\r.\r\n",
    b"\n\n.\n\n",
]

SMUGGLED = (
    b"MAIL FROM:<attacker@evil.example>\r\n"
    b"RCPT TO:<victim@example.net>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.net\r\n\r\nsmuggled\r\n"
    b".\r\n"
)


def session_bytes(vector: bytes) -> bytes:
    opening = greeted(b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"DATA")
    return opening + b"Subject: outer\r\n\r\nouter body" + vector + SMUGGLED + b"QUIT\r\n"


def feed(data: bytes, chunking: str) -> Session:
    if chunking == "one":
        return run([data])
    return run([data[i : i + 1] for i in range(len(data))])


@pytest.mark.parametrize("chunking", ["one", "bytes"])
@pytest.mark.parametrize("vector", VECTORS, ids=repr)
def test_smuggled_transaction_is_never_a_second_message(vector: bytes, chunking: str) -> None:
    session = feed(session_bytes(vector), chunking)
    assert session.messages == []
    outcomes = [r for r in session.replies if r.code in (250, 550, 552) and r.enhanced in ("2.0.0", "5.6.0", "5.3.4")]
    assert outcomes == [replies.BARE_LINE_ENDING_IN_DATA]
    # The smuggled MAIL/RCPT never reach the glue: only the outer transaction's decisions happen.
    assert [type(e).__name__ for e in session.events] == ["MailRequested", "RcptRequested", "SessionEnded"]
    assert session.replies[-1] == replies.BYE


@pytest.mark.parametrize("chunking", ["one", "bytes"])
@pytest.mark.parametrize("vector", VECTORS, ids=repr)
def test_vector_without_smuggled_payload_still_yields_one_outcome(vector: bytes, chunking: str) -> None:
    opening = greeted(b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"DATA")
    session = feed(opening + b"body" + vector + b"tail\r\n.\r\nNOOP\r\n", chunking)
    assert session.messages == []
    assert session.replies[-2:] == [replies.BARE_LINE_ENDING_IN_DATA, replies.OK]


@pytest.mark.parametrize("chunking", ["one", "bytes"])
def test_clean_session_with_the_same_shape_delivers_exactly_one_message(chunking: str) -> None:
    session = feed(session_bytes(b"\r\n"), chunking)
    # With a proper CRLF the smuggled commands are ordinary body lines of the single outer message.
    (message,) = session.messages
    assert b"MAIL FROM:<attacker@evil.example>\r\n" in message.data
    assert message.data.endswith(b"smuggled\r\n")
