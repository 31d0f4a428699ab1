"""Egress pools end to end: the receiving server (smtp-sink) sees each message come from its pool's source
address and EHLO name: by sender domain, else the default pool."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.support.harness import Cluster, SmtpSink, running

pytestmark = pytest.mark.integration


def _client_facts(path: Path) -> dict[str, str]:
    """smtp-sink's X-Client-Addr / X-Helo-Args lines of one dumped transaction."""
    facts = {}
    for line in path.read_text(errors="replace").splitlines():
        name, _, value = line.partition(": ")
        if name in ("X-Client-Addr", "X-Helo-Args"):
            facts[name] = value.strip()
        if not line:
            break
    return facts


def test_the_receiver_sees_the_pools_source_address_and_ehlo_name(tmp_path: Path) -> None:
    with running(SmtpSink()) as sink:
        cluster = Cluster(tmp_path / "c", overrides={
            "delivery": {"transports": {"example.net": f"smtp:[127.0.0.1]:{sink.port}"}},
            "egress": {
                "sources": {"seven": {"address": "127.0.0.7", "helo_name": "out7.mta.test"},
                            "eight": {"address": "127.0.0.8", "helo_name": "out8.mta.test"}},
                "pools": {"bulk": ["seven"], "default": ["eight"]},
                "sender_domains": {"news.test": "bulk"},
            },
        })
        with running(cluster):
            with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=10) as client:
                client.sendmail("alice@news.test", ["one@example.net"], b"Subject: bulk\r\n\r\nbulk\r\n")
                client.sendmail("bob@other.test", ["two@example.net"], b"Subject: other\r\n\r\nother\r\n")
            messages = {m.recipients[0]: m for m in sink.wait_for_messages(2)}
        assert _client_facts(messages["one@example.net"].path) == {"X-Client-Addr": "127.0.0.7",
                                                                    "X-Helo-Args": "out7.mta.test"}
        assert _client_facts(messages["two@example.net"].path) == {"X-Client-Addr": "127.0.0.8",
                                                                    "X-Helo-Args": "out8.mta.test"}
