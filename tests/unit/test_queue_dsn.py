"""RFC 3464 DSNs: build one, parse it back with the stdlib `email` package, check every field."""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import EmailMessage

import pytest

from cluster.bus.schemas import OutcomeKind
from cluster.queue.dsn import RecipientReport, build_dsn, status_of
from cluster.queue.records import LastOutcome
from tests.support.dsn import status_blocks

ARRIVAL = 1_700_000_000.0
ORIGINAL = (b"From: Alice <alice@sender.test>\r\nTo: bob@remote.test\r\nSubject: Hello\r\n"
            b"Message-ID: <m1@sender.test>\r\n\r\n")


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_failure_dsn_fields() -> None:
    data = build_dsn(
        reporting_mta="mx.me.test", queue_id="Q1", original_sender="alice@sender.test", arrival=ARRIVAL,
        reports=[RecipientReport("bob@remote.test", "failed", LastOutcome(
                     OutcomeKind.FAILED, 550, "5.1.1", "<bob@remote.test>: no such user", "mx1.remote.test[192.0.2.7]"),
                     ARRIVAL + 30),
                 RecipientReport("carol@nowhere.test", "failed",
                                 LastOutcome(OutcomeKind.FAILED, 554, "5.4.4", "Host not found"), ARRIVAL + 31)],
        original_headers=ORIGINAL, now=ARRIVAL + 32)
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"].addresses[0].addr_spec == "alice@sender.test"
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.me.test>"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == ARRIVAL + 32
    human, status, headers = list(message.iter_parts())
    assert human.get_content_type() == "text/plain"
    assert "<bob@remote.test> (remote host mx1.remote.test[192.0.2.7]): 550 5.1.1" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status_blocks(status)
    assert per_message["Reporting-MTA"] == "dns; mx.me.test"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: no such user"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == ARRIVAL + 30
    assert carol["Status"] == "5.4.4" and carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == "X-mtacluster; 554 5.4.4 Host not found"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_content().replace("\r\n", "\n") == ORIGINAL.decode().rstrip("\r\n").replace("\r\n", "\n") + "\n"


def test_delayed_dsn() -> None:
    message = parse(build_dsn(
        reporting_mta="mx.me.test", queue_id="Q2", original_sender="alice@sender.test", arrival=ARRIVAL,
        reports=[RecipientReport("bob@remote.test", "delayed",
                                 LastOutcome(OutcomeKind.DEFERRED, 421, "4.4.2", "timeout", "mx[192.0.2.1]"),
                                 ARRIVAL + 5)],
        original_headers=ORIGINAL, now=ARRIVAL + 3600, will_retry_until=ARRIVAL + 5 * 86400))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    _, status, _ = list(message.iter_parts())
    recipient = status_blocks(status)[1]
    assert (recipient["Action"], recipient["Status"]) == ("delayed", "4.4.2")
    assert email.utils.parsedate_to_datetime(recipient["Will-Retry-Until"]).timestamp() == ARRIVAL + 5 * 86400


@pytest.mark.parametrize(("last", "action", "expected"), [
    (LastOutcome(OutcomeKind.FAILED, 550, "5.7.1", "denied"), "failed", "5.7.1"),
    (LastOutcome(OutcomeKind.FAILED, 550, "", "denied"), "failed", "5.0.0"),
    (None, "failed", "5.0.0"),
    (LastOutcome(OutcomeKind.FAILED, 0, "", "deleted by the queue administrator"), "failed", "5.0.0"),
    (LastOutcome(OutcomeKind.DEFERRED, 451, "", "try later"), "delayed", "4.0.0"),
    (LastOutcome(OutcomeKind.EXPIRED, 451, "4.4.7", "delivery time expired"), "failed", "4.4.7"),
])
def test_status_comes_from_the_typed_outcome(last: LastOutcome | None, action: str, expected: str) -> None:
    assert status_of(RecipientReport("a@b.test", action, last, 0)) == expected


def test_non_ascii_headers_and_text_survive() -> None:
    message = parse(build_dsn(
        reporting_mta="mx.me.test", queue_id="Q3", original_sender="alice@sender.test", arrival=ARRIVAL,
        reports=[RecipientReport("jörg@bücher.test", "failed",
                                 LastOutcome(OutcomeKind.FAILED, 550, "5.1.1", "unbekannt"), 0)],
        original_headers="Subject: Grüße\r\n\r\n".encode(), now=ARRIVAL))
    _, status, headers = list(message.iter_parts())
    assert status_blocks(status)[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.test"
    assert "Grüße" in headers.get_content()
