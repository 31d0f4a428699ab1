"""Suppression: the bounce classifier, the durable list with its ttl, and the reply a suppressed recipient gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.queue.suppression import SUPPRESSING, SuppressionList, classify, suppressed_outcome


@pytest.mark.parametrize(("code", "enhanced", "text", "category"), [
    (550, "5.1.1", "<a@b>: Recipient address rejected: User unknown", "InvalidRecipient"),
    (550, "5.1.10", "null MX", "BadDomain"),
    (550, "5.1.2", "Domain does not exist", "BadDomain"),
    (550, "5.2.1", "The email account that you tried to reach is disabled", "InactiveMailbox"),
    (550, "5.0.0", "no such user here", "InvalidRecipient"),
    (552, "5.2.2", "Mailbox full", "QuotaIssues"),
    (554, "5.7.1", "Message rejected as spam", "SpamBlock"),
    (550, "5.7.26", "Unauthenticated email is not accepted", "AuthenticationFailed"),
    (550, "5.7.1", "Relaying denied", "PolicyRelated"),
    (554, "5.6.0", "Message content refused", "ContentRelated"),
    (550, "4.4.7", "delivery time expired", "MessageExpired"),
    (554, "5.0.0", "something else", "Uncategorized"),
])
def test_bounce_categories(code: int, enhanced: str, text: str, category: str) -> None:
    assert classify(code, enhanced, text) == category


def test_only_bad_addresses_suppress() -> None:
    assert {"InvalidRecipient", "BadDomain", "InactiveMailbox"} == SUPPRESSING
    assert classify(450, "4.1.1", "user unknown, try later") not in SUPPRESSING


def test_the_list_survives_a_restart_and_entries_expire(tmp_path: Path) -> None:
    path = tmp_path / "shard-0.suppression.sqlite"
    first = SuppressionList(path, ttl=3600)
    entry = first.add("Gone@Example.COM", "InvalidRecipient", "550 5.1.1 User unknown", now=1000.0)
    assert entry.until == 4600.0
    first.close()
    again = SuppressionList(path, ttl=3600)
    found = again.lookup("gone@example.com", 2000.0)
    assert found is not None and found.category == "InvalidRecipient"
    assert [e.address for e in again.entries(2000.0)] == ["gone@example.com"]
    assert again.lookup("gone@example.com", 4600.0) is None  # expired, and dropped
    assert len(again) == 0
    again.add("x@example.com", "AdminSuppressed", "550 5.1.1 by hand", now=0.0)
    assert again.remove("X@example.com") and not again.remove("x@example.com")
    again.close()
    assert not SuppressionList(None, ttl=0).enabled


def test_the_reply_says_why_and_keeps_the_original_status() -> None:
    entry = SuppressionList(None, ttl=60).add("a@b.test", "BadDomain", "556 5.1.10 null MX", now=0.0)
    reply = suppressed_outcome(entry).reply
    assert reply.startswith("550 5.1.10 Not attempted: this address is on the suppression list")
    assert "(BadDomain) on 1970-01-01 00:00:00 UTC: 556 5.1.10 null MX" in reply
