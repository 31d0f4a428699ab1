"""Admin commands against a whole cluster, as operators run them: several at once, and on a full disk.

- Overlapping `queue flush` runs, and flushes racing `hold`, `delete` and `bounce`, deliver nothing twice
  (counted at a real smtp-sink by Message-ID), and every delivery writes one `status=sent` log line.
- With the spool's file system really full (a small tmpfs, mounted as root), `delete`, `hold` and `bounce`
  say they failed (exit 1, the spool error on stderr), the message stays queued, new mail gets 452 4.3.1; once
  there is room again the same commands work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import smtplib
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import REPO, Cluster, SmtpSink, wait_for, write_config
from tests.support.scripted_smtp import ScriptedSmtpServer
from tests.support.tooling import free_port, require_root, require_tool

pytestmark = pytest.mark.integration

MESSAGES = 120


def mtacluster(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cluster", "queue", *args, "--config", str(cluster.config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finished(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def listing(cluster: Cluster) -> list[dict[str, Any]]:
    code, out, err = finished(mtacluster(cluster, "list", "--json", "--limit", "100000"))
    assert code == 0, err
    messages: list[dict[str, Any]] = json.loads(out)
    return messages


def send(port: int, messages: list[tuple[str, str]], sender: str = "alice@senders.test") -> None:
    """(recipient, Message-ID) pairs, one message each, over one SMTP session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for recipient, message_id in messages:
            client.sendmail(sender, [recipient], f"Message-ID: <{message_id}>\r\nSubject: race\r\n\r\nbody\r\n")


@pytest.fixture
def sink_port() -> int:
    return free_port()


def make_cluster(directory: Path, sink_port: int, workers: int = 2) -> Cluster:
    route = f"smtp:[127.0.0.1]:{sink_port}"
    return Cluster(directory, workers=workers, overrides={
        # Retries an hour apart: only `queue flush` makes deferred mail go within the test.
        "queue": {"retry_first": 3600, "retry_max": 3600, "max_lifetime": 86400, "min_free_space": 0},
        "delivery": {"connect_timeout": 2, "transports": {"sink.test": route, "senders.test": route}},
    })


def test_overlapping_admin_commands_deliver_nothing_twice(tmp_path: Path, sink_port: int) -> None:
    require_tool("smtp-sink")
    cluster = make_cluster(tmp_path, sink_port).start()
    sink = SmtpSink(port=sink_port)
    # First a server that answers every RCPT "not now" (the host works, so the destination is not held off as a
    # whole): every recipient is deferred for an hour. Then smtp-sink takes its place.
    busy = ScriptedSmtpServer("127.0.0.1", sink_port, rcpt_reply=lambda address: "451 4.3.0 Not now").start()
    busy_running = True
    try:
        run = uuid.uuid4().hex[:8]
        mail = [(f"r{n}@sink.test", f"{run}.{n}@senders.test") for n in range(MESSAGES)]
        send(cluster.smtp_port, mail)
        wait_for(lambda: (lambda queued: len(queued) == MESSAGES and all(
            r["state"] == "deferred" for m in queued for r in m["recipients"]))(listing(cluster)),
            30, "every message deferred")
        busy.stop()
        busy_running = False
        queued = sorted(listing(cluster), key=lambda m: m["recipients"][0]["address"])
        ids = [m["queue_id"] for m in queued]
        held, deleted, bounced = ids[0:3], ids[3:6], ids[6:9]
        sink.start()
        commands = [mtacluster(cluster, "flush") for _ in range(3)]
        commands += [mtacluster(cluster, op, queue_id) for op, chosen in (("hold", held), ("delete", deleted),
                                                                             ("bounce", bounced))
                     for queue_id in chosen]
        commands += [mtacluster(cluster, "flush") for _ in range(2)]
        results = [finished(c) for c in commands]
        for code, _, err in results:
            # A delete or bounce may find its message already delivered by a flush that came first.
            assert code == 0 or "unknown queue id" in err, err
        for queue_id in held:
            finished(mtacluster(cluster, "release", queue_id))  # held ones go too (if the hold came first)
        wait_for(lambda: listing(cluster) == [], 60, "an empty queue")
        received = Counter(m.message_id for m in sink.messages() if m.sender)
        removed = {mail[int(m["recipients"][0]["address"][1:].split("@")[0])][1]
                   for m in queued if m["queue_id"] in deleted + bounced}
        twice = {mid: n for mid, n in received.items() if n > 1}
        assert not twice, f"delivered more than once: {twice}"
        missing = [mid for _, mid in mail if f"<{mid}>" not in received and mid not in removed]
        assert not missing, f"never delivered: {missing}"
        # One log line per delivery, grep-able by queue id (the line may land just after the queue empties).
        delivered = [(queue_id, recipient) for queue_id, (recipient, mid) in zip(
            ids, sorted(mail, key=lambda pair: pair[0]), strict=True) if f"<{mid}>" in received]
        wait_for(lambda: all(f"{queue_id}: to=<{recipient}>" in cluster.shard_process(0).log()
                             for queue_id, recipient in delivered[:20]), 20, "the delivery log lines")
        log = cluster.shard_process(0).log()
        for queue_id, recipient in delivered[:20]:
            lines = [line for line in log.splitlines() if f"{queue_id}: to=<{recipient}>" in line
                     and "status=sent" in line]
            assert len(lines) == 1, (queue_id, lines)
            assert f"relay=127.0.0.1[127.0.0.1]:{sink_port}" in lines[0] and "dsn=2.0.0" in lines[0]
    finally:
        if busy_running:
            busy.stop()
        sink.stop()
        cluster.stop()


@contextlib.contextmanager
def small_file_system(path: Path, size: str) -> Iterator[Path]:
    require_root("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run([require_tool("mount"), "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run([require_tool("umount"), "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to make room again)."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):  # big pieces, then the last page, then the last bytes
            while True:
                try:
                    os.write(descriptor, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(descriptor)
    return filler


def test_admin_commands_say_so_when_the_disk_is_full(tmp_path: Path, sink_port: int) -> None:
    cluster = make_cluster(tmp_path, sink_port, workers=0)
    with small_file_system(tmp_path / "spool", "16m") as spool:
        cluster.start()
        try:
            send(cluster.smtp_port, [("r0@sink.test", "full.0@senders.test")])
            (message,) = listing(cluster)
            queue_id = message["queue_id"]
            filler = fill(spool)
            for op in ("delete", "hold", "bounce"):
                code, out, err = finished(mtacluster(cluster, op, queue_id))
                assert code == 1, (op, out, err)
                assert "spool error" in err and "full" in err, err
                assert "done" not in out and out == ""
            assert [m["queue_id"] for m in listing(cluster)] == [queue_id]  # still there, still ready
            assert listing(cluster)[0]["recipients"][0]["state"] == "ready"
            with pytest.raises(smtplib.SMTPDataError) as refused, smtplib.SMTP("127.0.0.1", cluster.smtp_port,
                                                                               timeout=30) as client:
                client.sendmail("alice@senders.test", ["r1@sink.test"], b"Subject: more\r\n\r\nbody\r\n")
            assert refused.value.smtp_code == 452 and b"4.3.1" in refused.value.smtp_error
            filler.unlink()
            code, out, err = finished(mtacluster(cluster, "delete", queue_id))
            assert code == 0, err
            assert f"message {queue_id}: 1 pending recipient deleted" in out
            assert listing(cluster) == []
        finally:
            cluster.stop()


def test_every_role_logs_json_lines_when_asked(tmp_path: Path, sink_port: int) -> None:
    cluster = make_cluster(tmp_path, sink_port, workers=1)
    cluster.sections["log"] = {"format": "json"}
    write_config(cluster.config_path, cluster.sections)
    cluster.start()
    try:
        send(cluster.smtp_port, [("r0@sink.test", "json.0@senders.test")])
        (message,) = wait_for(lambda: listing(cluster) or None, 20, "the message queued")
        queue_id = message["queue_id"]
        wait_for(lambda: f"{queue_id}: to=<r0@sink.test>" in cluster.shard_process(0).log(), 20,
                 "the deferral logged")
        for process in cluster.processes:
            # Every line is a JSON object, except the startup line `serve` prints on stdout.
            lines = [line for line in process.log().splitlines() if not line.startswith("mtacluster: ready")]
            assert all(json.loads(line)["role"] == process.role for line in lines), process.log()[-2000:]
            if process.role in ("queue", "frontend"):
                assert lines, f"{process.role} logged nothing"
        shard_entries = [json.loads(line) for line in cluster.shard_process(0).log().splitlines()
                         if line.startswith("{")]
        (deferral,) = [e for e in shard_entries if e.get("queue_id") == queue_id and e.get("to") == "r0@sink.test"]
        assert (deferral["status"], deferral["relay"]) == ("deferred", f"127.0.0.1[127.0.0.1]:{sink_port}")
        assert deferral["message"].startswith(f"{queue_id}: to=<r0@sink.test>, relay=")
        assert len(deferral["delays"]) == 4 and deferral["dsn"].startswith("4.")
    finally:
        cluster.stop()
