"""Draining a shard (issue 14, ARCHITECTURE.md contract 7): its queue goes to the new owners exactly once.

Three shards, real processes; the smarthost (a real smtp-sink) is absent at first, so mail for 30 domains is
deferred with one attempt made. `mtacluster shard drain 2 --wait` must leave shard 2 empty, with every pending
recipient held once by shards 0 and 1 with its attempts kept; new mail must never be stored on shard 2, also
after it restarts; and once the sink is there, every accepted (message, recipient) arrives exactly once, counted
by Message-ID at the sink. The same under kill -9 of the source and of a target in the middle of the drain.
A frontend takes a longer `queue.shards` on SIGHUP, and a worker when its configuration file changes (what a
Kubernetes ConfigMap update does), without a restart.
"""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cluster.bus.ring import shard_for_domain
from tests.support.harness import Cluster, RoleProcess, SmtpSink, wait_for, write_config
from tests.support.tooling import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOMAINS = 30


def cli(cluster: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", *args, "--config", str(cluster.config_path)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def queued(cluster: Cluster) -> list[dict[str, Any]]:
    result = cli(cluster, "queue", "list", "--json", "--limit", "100000")
    assert result.returncode == 0, result.stderr
    messages: list[dict[str, Any]] = json.loads(result.stdout)
    return messages


def pending(messages: list[dict[str, Any]]) -> Counter[str]:
    """How many times each pending recipient address is queued, over every shard."""
    return Counter(r["address"] for m in messages for r in m["recipients"]
                   if r["state"] not in ("delivered", "failed"))


def send(cluster: Cluster, start: int, count: int, accepted: set[tuple[str, str]]) -> None:
    """Messages start..start+count: most to one domain, every fifth to three domains (split by the frontend)."""
    with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as client:
        for i in range(start, start + count):
            domains = [(i + k * 7) % DOMAINS for k in range(3 if i % 5 == 0 else 1)]
            recipients = [f"r{i}.{k}@d{d}.test" for k, d in enumerate(domains)]
            message_id = f"<drain.{i}@sender.test>"
            client.sendmail("sender@sender.test", recipients,
                            f"Message-ID: {message_id}\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode())
            accepted.update((message_id, r) for r in recipients)


def all_deferred(cluster: Cluster, expected: int) -> bool:
    """Every domain was tried once and deferred; the other recipients of a domain wait (ready) for its backoff."""
    recipients = [r for m in queued(cluster) for r in m["recipients"]]
    tried = {r["address"].partition("@")[2] for r in recipients if r["state"] == "deferred" and r["attempts"] >= 1}
    return (len(recipients) == expected and len(tried) == DOMAINS
            and all(r["state"] in ("deferred", "ready") for r in recipients))


def start_cluster(tmp_path: Path, sink_port: int) -> Cluster:
    return Cluster(tmp_path / "cluster", shards=3, frontends=1, workers=1, metrics=True, overrides={
        "delivery": {"smarthost": f"127.0.0.1:{sink_port}"},
        # One attempt while the sink is away, then no retry until the test flushes.
        "queue": {"retry_first": 600, "retry_max": 600},
        "suppression": {"ttl": 86400},
    }).start()


def check_delivered_once(cluster: Cluster, sink: SmtpSink, accepted: set[tuple[str, str]]) -> None:
    sink.start()
    assert cli(cluster, "queue", "flush").returncode == 0

    def delivered() -> Counter[tuple[str, str]]:
        return Counter((m.message_id or "", r) for m in sink.messages() for r in m.recipients)

    wait_for(lambda: set(accepted) <= set(delivered()), 60,
             f"all {len(accepted)} accepted recipients at the sink", interval=0.5)
    wait_for(lambda: not queued(cluster), 30, "an empty queue")
    doubles = {key: n for key, n in delivered().items() if n > 1}
    assert not doubles, f"delivered more than once: {sorted(doubles)[:5]}"
    assert set(delivered()) == accepted


def test_drain_hands_the_queue_over_exactly_once_with_its_state(tmp_path: Path) -> None:
    sink = SmtpSink(port=free_port())
    cluster = start_cluster(tmp_path, sink.port)
    accepted: set[tuple[str, str]] = set()
    try:
        send(cluster, 0, 60, accepted)
        wait_for(lambda: all_deferred(cluster, len(accepted)), 60, "every recipient deferred once", interval=0.5)
        before = {r["address"]: (m["shard"], r["attempts"], r["last"]) for m in queued(cluster)
                  for r in m["recipients"]}
        on_shard_2 = [a for a, (shard, _, _) in before.items() if shard == 2]
        messages_on_2 = {m["queue_id"] for m in queued(cluster) if m["shard"] == 2}
        # A suppression entry owned by shard 2 (its domain's queue is there) moves with the drain.
        blocked = f"blocked@{on_shard_2[0].partition('@')[2]}"
        assert cli(cluster, "suppression", "add", blocked).returncode == 0
        listed = json.loads(cli(cluster, "suppression", "list", "--json").stdout)
        assert [e["address"] for e in listed] == [blocked]
        assert on_shard_2, "no mail on shard 2 to drain"

        started = time.monotonic()
        result = cli(cluster, "shard", "drain", "2", "--wait", "--timeout", "60", "--json")
        drain_seconds = time.monotonic() - started
        assert result.returncode == 0, result.stderr + cluster.logs()
        assert json.loads(result.stdout)["state"] == "drained"

        after = queued(cluster)
        assert not [m for m in after if m["shard"] == 2], "shard 2 still holds mail"
        assert json.loads(cli(cluster, "suppression", "list", "--json").stdout) == listed
        sizes = [cluster.shard_process(i).metric("mtacluster_suppression_list_size", shard=str(i)) for i in range(3)]
        assert sizes[2] == 0 and sum(sizes) == 1, sizes
        assert pending(after) == Counter(before.keys()), "a recipient was lost or doubled by the drain"
        kept = {r["address"]: (r["state"], r["attempts"], r["last"]) for m in after for r in m["recipients"]}
        for address in on_shard_2:
            if before[address][1]:  # tried once and deferred: the same state, attempts and last reply
                assert kept[address] == ("deferred", before[address][1], before[address][2]), address

        shard_2 = cluster.shard_process(2)
        stored_on_2 = shard_2.metric("mtacluster_queue_messages_stored_total", shard="2")
        assert shard_2.metric("mtacluster_queue_transfers_total", shard="2", outcome="sent") >= len(messages_on_2)
        wait_for(lambda: "shard 2 is drained" in cluster.logs() or "shard 2 is draining" in cluster.logs(), 10,
                 "the frontend to learn that shard 2 is not serving")
        send(cluster, 100, 30, accepted)
        assert shard_2.metric("mtacluster_queue_messages_stored_total", shard="2") == stored_on_2

        shard_2.stop()
        shard_2.start()
        shard_2.wait_ready()
        status = cli(cluster, "shard", "status", "--json")
        assert status.returncode == 0, status.stderr
        states = {row["shard"]: row for row in json.loads(status.stdout)}
        assert states[2]["state"] == "drained" and states[2]["ring_share"] == 0
        assert states[0]["ring_share"] == pytest.approx(0.5)
        send(cluster, 200, 30, accepted)
        assert shard_2.metric("mtacluster_queue_messages_stored_total", shard="2") == 0
        assert not [m for m in queued(cluster) if m["shard"] == 2]

        # Shard 2's outbox confirmed every transfer it deleted: the new owners forget those keys (journal.py).
        journals = [cluster.directory / "spool" / f"shard-{i}" / "transfers-received" for i in (0, 1)]
        wait_for(lambda: all(not p.exists() or not p.read_text().strip() for p in journals)
                 and all("received transfer keys (confirmed" in cluster.shard_process(i).log() for i in (0, 1)),
                 30, "the transfer journals of shards 0 and 1 trimmed")
        assert sum(cluster.shard_process(i).metric("mtacluster_queue_transfer_journal_entries", shard=str(i))
                   for i in (0, 1)) == 0

        check_delivered_once(cluster, sink, accepted)
        print(f"drained {len(messages_on_2)} messages ({len(on_shard_2)} recipients) from shard 2 in "
              f"{drain_seconds:.2f}s (CLI --wait included); accepted {len(accepted)} recipients, each delivered once")
    finally:
        cluster.stop()
        sink.stop()


@pytest.mark.parametrize("victim", ["source", "target"])
def test_drain_survives_kill_9(tmp_path: Path, victim: str) -> None:
    sink = SmtpSink(port=free_port())
    cluster = start_cluster(tmp_path, sink.port)
    accepted: set[tuple[str, str]] = set()
    try:
        send(cluster, 0, 150, accepted)
        wait_for(lambda: all_deferred(cluster, len(accepted)), 90, "every recipient deferred once", interval=0.5)
        before = pending(queued(cluster))

        assert cli(cluster, "shard", "drain", "2").returncode == 0
        killed = cluster.shard_process(2 if victim == "source" else 0)
        # Kill as soon as the drain has started moving (the victim has sent or received a transfer, or moved).
        wait_for(lambda: killed.metric("mtacluster_queue_drain_moved_messages_total", shard="2") > 0
                 if victim == "source" else
                 killed.metric("mtacluster_queue_transfers_total", shard="0", outcome="received") > 0,
                 30, "the drain to start", interval=0.02)
        killed.kill9()
        killed.start()
        killed.wait_ready()

        result = cli(cluster, "shard", "drain", "2", "--wait", "--timeout", "90", "--json")
        assert result.returncode == 0, result.stderr + cluster.logs()
        duplicates = sum(cluster.shard_process(i).metric("mtacluster_queue_transfers_total", shard=str(i),
                                                         outcome="duplicate") for i in range(2))
        print(f"kill -9 of the {victim}: drained, {duplicates:g} resent transfers answered without storing")
        after = queued(cluster)
        assert not [m for m in after if m["shard"] == 2]
        assert pending(after) == before, "a recipient was lost or doubled by the drain"
        check_delivered_once(cluster, sink, accepted)
    finally:
        cluster.stop()
        sink.stop()


def test_a_frontend_takes_a_new_shard_list_on_sighup(tmp_path: Path) -> None:
    """queue.shards grows from one shard to two in the frontend's file: after SIGHUP, new mail reaches shard 1."""
    cluster = Cluster(tmp_path / "cluster", shards=2, frontends=0, workers=0, metrics=True)
    frontend_sections = {**cluster.sections, "queue": {**cluster.sections["queue"],
                                                       "shards": cluster.sections["queue"]["shards"][:1]}}
    frontend_config = write_config(tmp_path / "frontend.toml", frontend_sections)
    frontend = RoleProcess("frontend", ["serve", "frontend", "--config", str(frontend_config)],
                           tmp_path / "frontend.log")
    cluster.processes.append(frontend)
    try:
        cluster.start()
        frontend.start()
        frontend.wait_ready()
        shard_1 = cluster.shard_process(1)
        send(cluster, 0, 10, set())
        assert shard_1.metric("mtacluster_queue_messages_stored_total", shard="1") == 0

        write_config(frontend_config, cluster.sections)
        assert frontend.process is not None
        frontend.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "queue.shards reloaded: 2 shards" in frontend.log(), 10, "the frontend to reload")
        wait_for(lambda: send(cluster, 10, 10, set()) is None and shard_1.metric(
            "mtacluster_queue_messages_stored_total", shard="1") > 0, 20, "new mail on shard 1", interval=0.5)
        assert frontend.process.poll() is None
    finally:
        cluster.stop()


def test_a_worker_takes_a_new_shard_list_when_its_file_changes(tmp_path: Path) -> None:
    """A worker configured with shard 0 only delivers nothing of shard 1's mail; once its file lists both
    shards (rewritten in place, no signal), it takes shard 1's jobs too."""
    sink = SmtpSink(port=free_port()).start()
    cluster = Cluster(tmp_path / "cluster", shards=2, frontends=1, workers=0, metrics=True,
                      overrides={"delivery": {"smarthost": sink.address}})
    worker_sections = {**cluster.sections, "queue": {**cluster.sections["queue"],
                                                     "shards": cluster.sections["queue"]["shards"][:1]}}
    worker_config = write_config(tmp_path / "worker.toml", worker_sections)
    worker = RoleProcess("worker", ["serve", "worker", "--config", str(worker_config)], tmp_path / "worker.log")
    cluster.processes.append(worker)
    shards = cluster.sections["queue"]["shards"]
    domains = {shard_for_domain(f"w{i}.test", shards): f"w{i}.test" for i in range(50)}
    try:
        cluster.start()
        worker.start()
        worker.wait_ready()
        with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as client:
            for index in (0, 1):
                client.sendmail("a@sender.test", [f"r@{domains[index]}"],
                                f"Message-ID: <reload.{index}@sender.test>\r\n\r\nbody\r\n".encode())
        wait_for(lambda: [m for m in sink.messages() if m.message_id == "<reload.0@sender.test>"], 30,
                 "shard 0's message at the sink")
        assert not [m for m in sink.messages() if m.message_id == "<reload.1@sender.test>"]
        assert [m["shard"] for m in queued(cluster)] == [1], "shard 1's message should wait for a worker"

        write_config(worker_config, cluster.sections)
        wait_for(lambda: "queue.shards reloaded: 2 shards" in worker.log(), 15,
                 f"the worker to reload; log:\n{worker.log()[-2000:]}")
        wait_for(lambda: [m for m in sink.messages() if m.message_id == "<reload.1@sender.test>"], 30,
                 "shard 1's message at the sink")
        wait_for(lambda: not queued(cluster), 15, "an empty queue")
        assert worker.process is not None and worker.process.poll() is None
    finally:
        cluster.stop()
        sink.stop()
