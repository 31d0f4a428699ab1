"""Delivery as real mail needs it, through the whole cluster (frontend -> shard -> worker -> peers).

Real DNS (dnsmasq serving a test zone whose MX records point at 127.0.0.x), real peers (smtp-sink, and a
scripted server where a test needs per-recipient answers or attempt times), real `mtacluster queue` commands.
"""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import REPO, Cluster, DnsServer, SmtpSink, wait_for
from tests.support.scripted_smtp import ScriptedSmtpServer
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

RETRY_FIRST = 1.0
RETRY_MAX = 2.0
MAX_LIFETIME = 8.0

# name -> address. Hosts with nothing listening are simply never started.
HOSTS = {
    "mx1.backup.test": "127.0.0.41",  # down
    "mx2.backup.test": "127.0.0.42",  # sink
    "busy.test": "127.0.0.43",  # smtp-sink -r rcpt: 4xx to every RCPT
    "later.test": "127.0.0.44",  # scripted: refuses the first connections, then accepts
    "never.test": "127.0.0.45",  # smtp-sink -r rcpt, and no backup: expires
    "mx.senders.test": "127.0.0.46",  # where bounces to the senders' domain go
    "aonly.test": "127.0.0.47",  # no MX, only an A record: implicit MX
    "picky.test": "127.0.0.48",  # scripted: refuses one recipient with 550 5.1.1
    "routed.test": "127.0.0.49",  # reached only through the transports table
}
MX = [
    ("backup.test", "mx1.backup.test", 10), ("backup.test", "mx2.backup.test", 20),
    ("busy.test", "busy.test", 10), ("busy.test", "mx2.backup.test", 20),
    ("later.test", "later.test", 10),
    ("never.test", "never.test", 10),
    ("senders.test", "mx.senders.test", 10),
    ("picky.test", "picky.test", 10),
]


@dataclass
class World:
    port: int
    dns: str
    sinks: dict[str, SmtpSink]
    later: ScriptedSmtpServer
    picky: ScriptedSmtpServer


def bodies_with(sink: SmtpSink, marker: str) -> list[Any]:
    return [m for m in sink.messages() if marker in m.text]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    port = free_port("127.0.0.42")
    dns = DnsServer(MX, HOSTS).start()
    sinks: dict[str, SmtpSink] = {}
    # "later" refuses its first two connections: attempts 1 and 2 defer, attempt 3 delivers.
    later = ScriptedSmtpServer(HOSTS["later.test"], port, greeting_reply=lambda n: "421 4.3.2 Not yet" if n <= 2
                               else None).start()
    picky = ScriptedSmtpServer(HOSTS["picky.test"], port, rcpt_reply=lambda a: "550 5.1.1 No such user here"
                               if a.startswith("bad") else None).start()
    try:
        for name, options in (("mx2.backup.test", []), ("busy.test", ["-r", "rcpt"]),
                              ("never.test", ["-r", "rcpt"]), ("mx.senders.test", []), ("aonly.test", []),
                              ("routed.test", [])):
            sinks[name] = SmtpSink(host=HOSTS[name], port=port, options=options).start()
        yield World(port, dns.address, sinks, later, picky)
    finally:
        for sink in sinks.values():
            sink.stop()
        later.stop()
        picky.stop()
        dns.stop()


def make_cluster(directory: Path, world: World, **queue: Any) -> Cluster:
    return Cluster(directory, metrics=True, overrides={
        "smtp": {"hostname": "mta.test"},
        "metrics": {"top_domains": ["backup.test"]},
        "queue": {"retry_first": RETRY_FIRST, "retry_max": RETRY_MAX, "max_lifetime": MAX_LIFETIME, **queue},
        "delivery": {"port": world.port, "nameservers": [world.dns], "connect_timeout": 2,
                     "transports": {"routed.test": f"smtp:[{HOSTS['routed.test']}]:{world.port}",
                                    "blocked.test": "error:5.7.1 We do not deliver to blocked.test"}},
    })


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Cluster]:
    cluster = make_cluster(tmp_path_factory.mktemp("cluster"), world)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def send(cluster: Cluster, recipients: list[str], marker: str, sender: str = "alice@senders.test") -> None:
    with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as client:
        client.sendmail(sender, recipients, f"Message-ID: <{marker}@senders.test>\r\nSubject: {marker}\r\n\r\n"
                        f"body {marker}\r\n".encode())


def bounces_for(world: World, marker: str) -> list[EmailMessage]:
    """DSNs that reached the senders' domain about the message carrying `marker`."""
    found = []
    for message in world.sinks["mx.senders.test"].messages():
        if marker in message.text and message.sender == "":
            parsed = email.message_from_string(message.text, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            found.append(parsed)
    return found


def dsn_fields(dsn: EmailMessage) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(per-message fields, per-recipient fields) of the message/delivery-status part."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    part = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    blocks = [dict(block.items()) for block in part.get_payload()]  # type: ignore[union-attr]
    return blocks[0], blocks[1:]


def attempts(cluster: Cluster, outcome: str, domain: str) -> float:
    """The (only) worker's count of per-recipient delivery attempts with `outcome` to `domain` (a top domain)."""
    (worker,) = [p for p in cluster.processes if p.role == "worker"]
    return worker.metric("mtacluster_delivery_attempts_total", outcome=outcome, domain=domain)


def test_backup_mx_takes_over_in_the_same_attempt_when_the_primary_is_down(cluster: Cluster,
                                                                           world: World) -> None:
    before = {outcome: attempts(cluster, outcome, "backup.test") for outcome in ("delivered", "deferred")}
    marker = uuid.uuid4().hex
    send(cluster, ["user@backup.test"], marker)
    wait_for(lambda: bodies_with(world.sinks["mx2.backup.test"], marker), 20, "delivery to the backup MX")
    # One attempt that reached the backup, not a deferral followed by a retry (retry_first is only 1 s here).
    wait_for(lambda: attempts(cluster, "delivered", "backup.test") == before["delivered"] + 1, 10,
             "the worker to count the delivery")
    deferred = attempts(cluster, "deferred", "backup.test") - before["deferred"]
    assert deferred == 0, f"{deferred:g} deferred attempt(s) before the backup MX took the message"


def test_primary_answering_4xx_to_every_rcpt_sends_mail_to_the_backup(cluster: Cluster, world: World) -> None:
    marker = uuid.uuid4().hex
    send(cluster, ["user@busy.test"], marker)
    wait_for(lambda: bodies_with(world.sinks["mx2.backup.test"], marker), 20, "delivery to the backup MX")
    assert not bodies_with(world.sinks["busy.test"], marker)


def test_all_hosts_down_defers_and_retries_on_schedule_until_delivered(cluster: Cluster, world: World) -> None:
    marker = uuid.uuid4().hex
    before = len(world.later.connection_times)
    send(cluster, ["user@later.test"], marker)
    wait_for(lambda: any(marker.encode() in m.data for m in world.later.messages), 30, "delivery on the 3rd try")
    attempts = world.later.connection_times[before:]
    assert len(attempts) == 3, attempts
    first_gap, second_gap = attempts[1] - attempts[0], attempts[2] - attempts[1]
    # retry_first, then doubled (capped at retry_max), each +-10 % jitter, plus the shard's timer slack.
    assert RETRY_FIRST * 0.9 - 0.05 <= first_gap <= RETRY_FIRST * 1.1 + 0.75, first_gap
    assert RETRY_MAX * 0.9 - 0.05 <= second_gap <= RETRY_MAX * 1.1 + 0.75, second_gap


def test_expiry_bounces_to_the_sender_with_the_remote_servers_words(cluster: Cluster, world: World) -> None:
    marker = uuid.uuid4().hex
    send(cluster, ["user@never.test"], marker)
    dsn = wait_for(lambda: bounces_for(world, marker), MAX_LIFETIME + 20, "the expiry bounce")[0]
    assert dsn["To"] == "alice@senders.test"
    per_message, recipients = dsn_fields(dsn)
    assert per_message["Reporting-MTA"] == "dns; mta.test"
    assert "Arrival-Date" in per_message
    (recipient,) = recipients
    assert recipient["Final-Recipient"] == "rfc822; user@never.test"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "4.4.7"
    assert recipient["Remote-MTA"].startswith("dns; never.test")
    # smtp-sink's own words for its -r rcpt refusal.
    assert recipient["Diagnostic-Code"].startswith("smtp; 450"), recipient["Diagnostic-Code"]
    headers = next(p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers")
    assert marker in str(headers.get_payload())


def test_one_refused_recipient_of_three_bounces_alone(cluster: Cluster, world: World) -> None:
    marker = uuid.uuid4().hex
    send(cluster, ["good1@picky.test", "bad@picky.test", "good2@picky.test"], marker)
    delivered = wait_for(lambda: [m for m in world.picky.messages if marker.encode() in m.data], 20,
                         "delivery of the two good recipients")
    assert len(delivered) == 1 and sorted(delivered[0].recipients) == ["good1@picky.test", "good2@picky.test"]
    (dsn,) = wait_for(lambda: bounces_for(world, marker), 20, "the bounce for bad@picky.test")
    _, recipients = dsn_fields(dsn)
    assert [(r["Final-Recipient"], r["Status"]) for r in recipients] == [("rfc822; bad@picky.test", "5.1.1")]
    assert "No such user here" in recipients[0]["Diagnostic-Code"]


@pytest.mark.parametrize(("domain", "status"), [("nullmx.test", "5.1.10"), ("nxdomain.test", "5.1.2"),
                                                ("blocked.test", "5.7.1")])
def test_permanent_routing_failures_bounce_at_once(cluster: Cluster, world: World, domain: str,
                                                   status: str) -> None:
    marker = uuid.uuid4().hex
    send(cluster, [f"user@{domain}"], marker)
    (dsn,) = wait_for(lambda: bounces_for(world, marker), 20, f"the bounce for {domain}")
    _, recipients = dsn_fields(dsn)
    assert recipients[0]["Status"] == status


def test_implicit_mx_and_transport_route(cluster: Cluster, world: World) -> None:
    marker = uuid.uuid4().hex
    send(cluster, ["user@aonly.test", "user@routed.test"], marker)
    wait_for(lambda: bodies_with(world.sinks["aonly.test"], marker), 20, "delivery to the A record")
    wait_for(lambda: bodies_with(world.sinks["routed.test"], marker), 20, "delivery through the transport")


def dsns_generated(cluster: Cluster) -> float:
    return cluster.shard_process(0).metric("mtacluster_queue_bounces_generated_total", shard="0", kind="failed")


def queued_for(cluster: Cluster, address: str) -> list[dict[str, Any]]:
    return [m for m in queue_command(cluster, "list") if any(r["address"] == address for r in m["recipients"])]


def test_never_bounce_a_bounce(cluster: Cluster, world: World) -> None:
    """A permanent failure of a null-sender message makes no DSN (RFC 5321 6.1: never bounce a bounce).

    Such a DSN could never reach a sink (its recipient would be the null sender), so the test watches the shard
    instead: its count of generated DSNs and its queue. The same failure from a real sender, sent alongside,
    shows that the count does move when a DSN is made.
    """
    before = dsns_generated(cluster)
    null_marker, control_marker = uuid.uuid4().hex, uuid.uuid4().hex
    null_recipient = f"null-{null_marker}@nullmx.test"
    send(cluster, [null_recipient], null_marker, sender="")
    send(cluster, [f"control-{control_marker}@nullmx.test"], control_marker)
    wait_for(lambda: bounces_for(world, control_marker), 20, "the bounce of the control message")
    wait_for(lambda: not queued_for(cluster, null_recipient), 20, "the null-sender message to fail")
    assert dsns_generated(cluster) == before + 1, "a DSN was made for the null-sender message"
    assert not queued_for(cluster, ""), "a message addressed to the null sender is queued"
    assert not [m for m in world.sinks["mx.senders.test"].messages() if null_marker in m.text]


def queue_command(cluster: Cluster, *args: str) -> Any:
    result = subprocess.run([sys.executable, "-m", "cluster", "queue", "--config", str(cluster.config_path),
                             "--json", *args], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_servfail_defers_and_queue_commands_steer_it(tmp_path: Path, world: World) -> None:
    # Retries an hour apart: only `queue flush` can make anything happen within the test.
    cluster = make_cluster(tmp_path, world, retry_first=3600, retry_max=3600, max_lifetime=86400).start()
    try:
        marker = uuid.uuid4().hex
        send(cluster, ["user@servfail.test"], marker)

        def deferred() -> list[dict[str, Any]]:
            listing = queue_command(cluster, "list", "--deferred")
            return [m for m in listing if any(r["state"] == "deferred" for r in m["recipients"])]

        (message,) = wait_for(deferred, 20, "the SERVFAIL message to be deferred")
        last = message["recipients"][0]["last"]
        assert (last["kind"], last["code"], last["enhanced"]) == ("deferred", 451, "4.4.3")
        queue_id = message["queue_id"]
        shown = queue_command(cluster, "show", queue_id)
        assert marker in json.dumps(shown)

        queue_command(cluster, "hold", queue_id)
        queue_command(cluster, "flush")
        listing = queue_command(cluster, "list")
        assert [r["state"] for m in listing if m["queue_id"] == queue_id for r in m["recipients"]] == ["held"]

        queue_command(cluster, "delete", queue_id)
        assert not [m for m in queue_command(cluster, "list") if m["queue_id"] == queue_id]
    finally:
        cluster.stop()


def test_flush_delivers_deferred_mail_now(tmp_path: Path, world: World) -> None:
    cluster = make_cluster(tmp_path, world, retry_first=3600, retry_max=3600, max_lifetime=86400).start()
    down = ScriptedSmtpServer(HOSTS["later.test"], world.port, greeting_reply=lambda n: "421 4.3.2 Busy"
                              if n == 1 else None)
    try:
        # The "later" host of the module is a different object: stop it and put a fresh one in its place.
        world.later.stop()
        down.start()
        marker = uuid.uuid4().hex
        send(cluster, ["user@later.test"], marker)
        wait_for(lambda: any(r["state"] == "deferred" for m in queue_command(cluster, "list") for r in
                             m["recipients"]), 20, "the message to be deferred")
        assert not down.messages
        queue_command(cluster, "flush", "--domain", "later.test")
        wait_for(lambda: any(marker.encode() in m.data for m in down.messages), 20, "delivery after flush")
        wait_for(lambda: queue_command(cluster, "list") == [], 20, "an empty queue")
    finally:
        down.stop()
        world.later.start()
        cluster.stop()
