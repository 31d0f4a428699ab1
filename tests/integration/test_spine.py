"""The spine end to end: real clients -> 2 frontends -> 2 queue shards -> 2 workers -> smtp-sink.

Clients: Python's smtplib, swaks and Postfix's smtp-source. Every message must arrive exactly once, with its
body byte-identical after the Received header we add, for recipients in the domains of both shards.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.bus.ring import shard_for_domain
from tests.support.harness import Cluster, SinkMessage, SmtpSink, wait_for
from tests.support.tooling import require_tool

pytestmark = pytest.mark.integration


def domains_for_each_shard(shards: list[str]) -> list[str]:
    """One recipient domain owned by each shard."""
    found: dict[int, str] = {}
    for i in range(1000):
        domain = f"dest{i}.test"
        found.setdefault(shard_for_domain(domain, shards), domain)
        if len(found) == len(shards):
            return [found[index] for index in range(len(shards))]
    raise AssertionError("no domain found for some shard")


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    sink = SmtpSink(tmp_path_factory.mktemp("sink") / "dump").start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, sink: SmtpSink) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), shards=2, frontends=2, workers=2,
                      overrides={"delivery": {"smarthost": sink.address}})
    try:
        yield cluster.start()
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


def test_smtplib_messages_reach_both_shards_domains_once_and_intact(cluster: Cluster, sink: SmtpSink) -> None:
    shards = cluster.sections["queue"]["shards"]
    domain_a, domain_b = domains_for_each_shard(shards)
    marker = uuid.uuid4().hex
    bodies = {}
    with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as client:
        for i in range(10):
            body = (f"From: a@sender.test\r\nTo: x@{domain_a}\r\nSubject: spine {i}\r\n"
                    f"Message-ID: <{marker}.{i}@sender.test>\r\n\r\n"
                    f"line one {marker}\r\n.leading dot\r\n..two dots\r\n\tTabbed \xe9 8-bit\r\n"
                    ).encode("latin-1") + bytes(range(32, 127)) + b"\r\n"
            bodies[f"<{marker}.{i}@sender.test>"] = body
            refused = client.sendmail("a@sender.test", [f"x{i}@{domain_a}", f"y{i}@{domain_b}"], body)
            assert refused == {}
    expected_deliveries = 20  # each message: one transaction per destination domain
    wait_for(lambda: len([m for m in sink.messages() if marker in m.text]) >= expected_deliveries, 30,
             f"{expected_deliveries} deliveries at the sink")
    delivered = [m for m in sink.messages() if marker in m.text]
    assert len(delivered) == expected_deliveries, cluster.logs()
    per_message: dict[str, list[str]] = {}
    for message in delivered:
        assert message.message_id is not None
        per_message.setdefault(message.message_id, []).extend(message.recipients)
        original = bodies[message.message_id].decode("latin-1").replace("\r\n", "\n")
        assert message.without_trace_headers() == original
        assert message.sender == "a@sender.test"
        # Our Received header comes first and names us.
        assert message.text.startswith("Received: from ") and "by mta.test (mtacluster)" in message.text
    assert len(per_message) == 10
    for message_id, recipients in per_message.items():
        i = message_id.split(".")[1].split("@")[0]
        assert sorted(recipients) == sorted([f"x{i}@{domain_a}", f"y{i}@{domain_b}"])


def test_swaks_delivers(cluster: Cluster, sink: SmtpSink, tmp_path: Path) -> None:
    swaks = require_tool("swaks")
    marker = uuid.uuid4().hex
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(cluster.smtp_port), "--from", "s@sender.test",
         "--to", "r@swaks.test", "--header", f"Message-ID: <{marker}@sender.test>", "--body", f"swaks {marker}",
         "--pipeline"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    message = wait_for(lambda: [m for m in sink.messages() if marker in m.text], 30, "the swaks message")[0]
    assert message.recipients == ["r@swaks.test"]


def test_smtp_source_load_all_delivered_once(cluster: Cluster, sink: SmtpSink) -> None:
    smtp_source = require_tool("smtp-source")
    count = 300
    subprocess.run([smtp_source, "-s", "10", "-m", str(count), "-l", "2048", "-f", "load@sender.test",
                    "-t", "sink@load.test", f"127.0.0.1:{cluster.smtp_port}"],
                   check=True, timeout=120, capture_output=True)
    def loaded() -> list[SinkMessage]:
        return [m for m in sink.messages() if m.sender == "load@sender.test"]

    wait_for(lambda: len(loaded()) >= count, 60, f"{count} smtp-source messages delivered")
    # Exactly once: no message may be delivered twice when nothing crashed (ARCHITECTURE.md contract 2).
    assert len(loaded()) == count


def test_relay_refused_for_outsiders_but_local_domains_accepted(tmp_path: Path, sink: SmtpSink) -> None:
    cluster = Cluster(tmp_path, shards=1, frontends=1, workers=1,
                      overrides={"delivery": {"smarthost": sink.address},
                                 # outsider.test exists nowhere; the sender checks are tested in
                                 # test_accounts_e2e.py, this test is about relaying.
                                 "smtp": {"relay_networks": ["127.0.0.1/32"], "reject_unknown_sender_domain": False,
                                          "spf": "off"}})
    try:
        cluster.start()
        with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30, source_address=("127.0.0.5", 0)) as client:
            client.ehlo("outsider.test")
            client.mail("someone@outsider.test")
            code, text = client.rcpt("victim@elsewhere.test")
            assert (code, text[:5]) == (554, b"5.7.1")
            code, _ = client.rcpt("user@local.test")
            assert code == 250
        with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as insider:
            insider.ehlo("insider.test")
            insider.mail("user@inside.test")
            assert insider.rcpt("friend@elsewhere.test")[0] == 250
    finally:
        cluster.stop()


def test_low_disk_refuses_new_mail_with_452(tmp_path: Path, sink: SmtpSink) -> None:
    # More free space required than any disk has: the shard's statvfs check refuses every inject.
    cluster = Cluster(tmp_path, overrides={"delivery": {"smarthost": sink.address},
                                           "queue": {"min_free_space": 2**62}})
    try:
        cluster.start()
        with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("a@sender.test")
            assert client.rcpt("b@dest.test")[0] == 250
            code, text = client.data(b"Subject: full\r\n\r\nbody\r\n")
            assert (code, text) == (452, b"4.3.1 Insufficient system storage")
            # The session goes on: the client may try again later, nothing was half-stored.
            assert client.noop()[0] == 250
        listing = subprocess.run([sys.executable, "-m", "cluster", "queue", "--config", str(cluster.config_path),
                                  "--json", "list"], capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(listing.stdout) == []  # nothing was stored, so nothing can be lost or duplicated
    finally:
        cluster.stop()
