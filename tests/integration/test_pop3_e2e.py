"""End to end: SMTP in at a frontend, queued by a shard, handed by a worker over LMTP to the mailbox role,
written to its Maildir, fetched by POP3."""

from __future__ import annotations

import poplib
import smtplib
import uuid
from pathlib import Path

import pytest

from cluster.users import add_user
from tests.support.harness import Cluster, wait_for
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration


def test_mail_to_a_local_domain_is_fetched_by_pop3(tmp_path: Path) -> None:
    users_file = tmp_path / "users"
    add_user(str(users_file), "alice@local.test", "pw for alice")
    pop3_port, lmtp_port = free_port(), free_port()
    cluster = Cluster(tmp_path / "cluster", overrides={
        "delivery": {"transports": {"local.test": "local"}},
        "auth": {"users_file": str(users_file)},
        "mailbox": {"pop3_listen": [f"127.0.0.1:{pop3_port}"], "lmtp_listen": [f"127.0.0.1:{lmtp_port}"],
                    "nodes": [f"127.0.0.1:{lmtp_port}"], "maildir_root": str(tmp_path / "maildir")},
    })
    pop3 = cluster.role("mailbox")
    try:
        cluster.start()
        pop3.start().wait_ready()
        markers = [uuid.uuid4().hex for _ in range(2)]
        with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as client:
            for marker in markers:
                client.sendmail("bob@example.net", ["Alice@local.test"],
                                f"Subject: {marker}\r\n\r\nline one\r\n.line with a dot\r\n".encode())

        def mailbox_count() -> int:
            session = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
            session.user("alice@local.test")
            session.pass_("pw for alice")
            count: int = session.stat()[0]
            session.quit()
            return count

        wait_for(lambda: mailbox_count() == 2, 30, f"2 messages in alice's maildrop; logs:\n{cluster.logs()}")
        session = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
        session.user("alice@local.test")
        session.pass_("pw for alice")
        texts = [b"\r\n".join(session.retr(n)[1]) for n in (1, 2)]
        assert sorted(markers) == sorted(m for m in markers for t in texts if f"Subject: {m}".encode() in t)
        for text in texts:
            assert text.startswith(b"Return-Path: <bob@example.net>\r\nReceived: from ")
            assert text.endswith(b"\r\n\r\nline one\r\n.line with a dot")
        session.dele(1)
        session.dele(2)
        session.quit()
        assert mailbox_count() == 0
        assert list((tmp_path / "maildir" / "alice" / "cur").iterdir()) == []
    finally:
        pop3.stop()
        cluster.stop()
