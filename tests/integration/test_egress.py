"""Egress pools end to end: the receiving server (smtp-sink) sees each message come from its pool's source
address and EHLO name: by sender domain, else the default pool; the source is the one the shard chose (its
log line says which), and shaping limits hold per (source, destination)."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest

from tests.support.harness import Cluster, SmtpSink, running, wait_for

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


def test_the_shard_chooses_the_source_and_limits_hold_per_source(tmp_path: Path) -> None:
    """A destination allowed 1 message an hour gets two at once from a pool of two sources (one each): the
    limit counts per (source, destination). Each arrives from the address and EHLO name of the source the
    shard's log line names for it."""
    addresses = {"seven": ("127.0.0.7", "out7.mta.test"), "nine": ("127.0.0.9", "out9.mta.test")}
    with running(SmtpSink()) as sink:
        cluster = Cluster(tmp_path / "c", overrides={
            "delivery": {"transports": {"example.net": f"smtp:[127.0.0.1]:{sink.port}"}},
            "egress": {
                "sources": {name: {"address": a, "helo_name": h} for name, (a, h) in addresses.items()},
                "pools": {"default": ["seven", "nine"]},
            },
            "shaping": {"example.net": {"max_message_rate": "1/h"}},
        })
        with running(cluster):
            with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=10) as client:
                for recipient in ("one@example.net", "two@example.net"):
                    client.sendmail("bob@other.test", [recipient], b"Subject: x\r\n\r\nx\r\n")
            messages = {m.recipients[0]: m for m in sink.wait_for_messages(2)}
            pattern = re.compile(r"to=<(\S+@example\.net)>, relay=\S+, source=(\w+), .*status=sent")

            def sent_lines() -> dict[str, str] | None:
                found = dict(pattern.findall("".join(p.log() for p in cluster.processes if p.role == "queue")))
                return found if len(found) == 2 else None

            logged = wait_for(sent_lines, 10, "two sent lines naming their source")
        assert sorted(logged.values()) == ["nine", "seven"]
        for recipient, source in logged.items():
            address, helo_name = addresses[source]
            assert _client_facts(messages[recipient].path) == {"X-Client-Addr": address, "X-Helo-Args": helo_name}
