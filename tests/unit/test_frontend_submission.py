"""RFC 6409 8.2 / 8.3: what the submission listeners add to a client's message (`cluster.frontend.submission`)."""

from __future__ import annotations

import email
import email.policy

import pytest

from cluster.frontend.submission import complete_headers

NOON = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000


def complete(data: bytes) -> bytes:
    return complete_headers(data, hostname="mx.example.test", trace_id="tr4ce", timestamp=NOON)


def test_both_fields_are_added_at_the_end_of_the_header_section() -> None:
    out = complete(b"From: a@b.example\r\nSubject: hi\r\n\r\nbody\r\n")
    assert out == (b"From: a@b.example\r\nSubject: hi\r\nMessage-ID: <tr4ce.1700000000@mx.example.test>\r\n"
                   b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\nbody\r\n")
    parsed = email.message_from_bytes(out, policy=email.policy.SMTP)
    assert parsed["Message-ID"] == "<tr4ce.1700000000@mx.example.test>"
    assert parsed["Date"].datetime.timestamp() == NOON
    assert parsed.get_content().strip() == "body"


@pytest.mark.parametrize("message", [
    b"Message-ID: <x@y>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n",
    b"date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMESSAGE-ID:\r\n <x@y>\r\n\r\nbody\r\n",
])
def test_a_message_with_both_fields_is_unchanged_byte_for_byte(message: bytes) -> None:
    assert complete(message) == message


def test_only_the_missing_field_is_added() -> None:
    out = complete(b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n")
    assert out.count(b"Date:") == 1 and b"Message-ID: <tr4ce." in out
    out = complete(b"Message-Id: <x@y>\r\n\r\nbody\r\n")
    assert out.count(b"Message-I") == 1 and b"\r\nDate: " in out


def test_fields_in_the_body_or_in_a_folded_line_do_not_count() -> None:
    out = complete(b"Subject: about\r\n Message-ID: and Date:\r\n\r\nMessage-ID: <in@body>\r\nDate: x\r\n")
    head = out.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nMessage-ID: <tr4ce." in head and b"\r\nDate: Tue" in head


def test_a_message_without_a_header_section_keeps_its_text_as_body() -> None:
    out = complete(b"just some text, no header\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"Message-ID: ") and body == b"just some text, no header\r\n"
    assert complete(b"\r\nbody\r\n").endswith(b"\r\n\r\nbody\r\n")
    assert complete(b"").endswith(b"+0000\r\n\r\n")


def test_a_message_of_header_fields_only() -> None:
    assert complete(b"Subject: only a header").startswith(b"Subject: only a header\r\nMessage-ID: ")
