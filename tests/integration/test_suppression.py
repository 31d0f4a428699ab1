"""Suppression end to end: a recipient that hard-bounced (550 5.1.1 from a real SMTP peer) is put on the
suppression list of its shard; a later message to it fails at once with a DSN that says so, and the peer never
sees that address again; `mtacluster suppression list/add/remove` manage the list."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import Cluster, running, wait_for
from tests.support.scripted_smtp import ScriptedSmtpServer

pytestmark = pytest.mark.integration


def _cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", "suppression", *args, "--config",
                           str(cluster.config_path)], capture_output=True, text=True, timeout=30)


def test_a_hard_bounced_recipient_is_not_attempted_again(tmp_path: Path) -> None:
    asked: list[str] = []

    def rcpt_reply(address: str) -> str | None:
        asked.append(address)
        return "550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown" if "gone" in address else None

    with running(ScriptedSmtpServer("127.0.0.1", rcpt_reply=rcpt_reply)) as peer:
        route = f"smtp:[127.0.0.1]:{peer.port}"
        cluster = Cluster(tmp_path / "c", overrides={
            "delivery": {"transports": {"dest.test": route, "sender.test": route}},
            "suppression": {"ttl": "1h"},
            "queue": {"retry_first": 1},
        })
        with running(cluster):
            with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=10) as client:
                client.sendmail("me@sender.test", ["gone@dest.test", "ok@dest.test"], b"Subject: one\r\n\r\n1\r\n")
            # The first bounce: its DSN reaches the sender; the address is on the list.
            wait_for(lambda: any(m.recipients == ["me@sender.test"] for m in peer.messages), 30, "the first DSN")
            listed = wait_for(lambda: json.loads(_cli(cluster, "list", "--json").stdout or "[]"), 10,
                              "the address on the suppression list")
            assert [(e["address"], e["category"]) for e in listed] == [("gone@dest.test", "InvalidRecipient")]
            attempts_before = asked.count("gone@dest.test")
            with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=10) as client:
                client.sendmail("me@sender.test", ["gone@dest.test", "ok2@dest.test"], b"Subject: two\r\n\r\n2\r\n")
            dsns = wait_for(lambda: [m for m in peer.messages if m.recipients == ["me@sender.test"]][1:], 30,
                            "the DSN for the suppressed recipient")
            wait_for(lambda: any(m.recipients == ["ok2@dest.test"] for m in peer.messages), 30, "ok2 delivered")
            shard_log = "".join(p.log() for p in cluster.processes if p.role == "queue")
            # The CLI: remove takes it off the list, add puts it back by hand.
            removed = _cli(cluster, "remove", "gone@dest.test")
            after_remove = json.loads(_cli(cluster, "list", "--json").stdout)
            added = _cli(cluster, "add", "Someone@Dest.test")
            after_add = json.loads(_cli(cluster, "list", "--json").stdout)
    assert asked.count("gone@dest.test") == attempts_before == 1
    text = dsns[0].data.decode("utf-8", "replace")
    assert "suppression list" in text and "InvalidRecipient" in text and "gone@dest.test" in text
    assert "status=bounced (suppressed: InvalidRecipient" in shard_log
    assert removed.returncode == 0 and "removed from the suppression list" in removed.stdout
    assert after_remove == []
    assert added.returncode == 0, added.stderr
    assert [(e["address"], e["category"]) for e in after_add] == [("someone@dest.test", "AdminSuppressed")]
