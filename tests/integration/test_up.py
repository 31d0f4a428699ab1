"""`mtacluster up`: the whole cluster as child processes, one startup line each, clean stop, no orphans."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cluster.config import UpConfig, up_processes
from tests.support.harness import REPO, SmtpSink, port_open, wait_for, write_config
from tests.support.tooling import free_port, free_ports_in_a_row

pytestmark = pytest.mark.integration


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_runs_every_role_delivers_and_stops_cleanly(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    smtp_port = free_port()
    pop3_port, lmtp_port = free_port(), free_port()
    metrics_port = free_ports_in_a_row(6)
    config = write_config(tmp_path / "up.toml", {
        "smtp": {"listen": [f"127.0.0.1:{smtp_port}"], "hostname": "up.test"},
        "queue": {"shards": [f"tcp://127.0.0.1:{free_port()}"], "spool_dir": str(tmp_path / "spool")},
        "delivery": {"smarthost": sink.address},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "mailbox": {"pop3_listen": [f"127.0.0.1:{pop3_port}"], "lmtp_listen": [f"127.0.0.1:{lmtp_port}"],
                    "nodes": [f"127.0.0.1:{lmtp_port}"], "maildir_root": str(tmp_path / "maildir")},
        "up": {"frontends": 2, "workers": 2},
    })
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "cluster", "up", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: log_path.read_text().count("mtacluster: ready") >= 6, 30,
                 "6 ready lines (1 shard, 2 workers, 1 mailbox, 2 frontends)")
        text = log_path.read_text()
        for role, count in (("queue", 1), ("worker", 2), ("mailbox", 1), ("frontend", 2)):
            assert text.count(f"ready role={role} pid=") == count, text
        assert f"smtp=127.0.0.1:{smtp_port}" in text
        assert f"lmtp=127.0.0.1:{lmtp_port} pop3=127.0.0.1:{pop3_port}" in text
        for offset in range(6):
            assert f"metrics=127.0.0.1:{metrics_port + offset}" in text
        children = children_of(up.pid)
        assert len(children) == 6

        marker = uuid.uuid4().hex
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            client.sendmail("a@sender.test", ["b@dest.test"], f"Subject: {marker}\r\n\r\nhello\r\n".encode())
        wait_for(lambda: any(marker in m.text for m in sink.messages()), 30, "delivery through `up`")

        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        assert not [pid for pid in children if alive(pid)], "children left running after the supervisor stopped"
        assert not port_open("127.0.0.1", smtp_port)
        assert not port_open("127.0.0.1", pop3_port) and not port_open("127.0.0.1", lmtp_port)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        sink.stop()


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    smtp_port, lmtp_port = free_port(), free_port()
    config = write_config(tmp_path / "up.toml", {
        "smtp": {"listen": [f"127.0.0.1:{smtp_port}"]},
        "queue": {"shards": [f"tcp://127.0.0.1:{free_port()}"], "spool_dir": str(tmp_path / "spool")},
        "metrics": {"listen": ""},
        "mailbox": {"pop3_listen": [f"127.0.0.1:{free_port()}"], "lmtp_listen": [f"127.0.0.1:{lmtp_port}"],
                    "nodes": [f"127.0.0.1:{lmtp_port}"]},
        "up": {"frontends": 1, "workers": 1},
    })
    up = subprocess.Popen([sys.executable, "-m", "cluster", "up", "--config", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_for(lambda: port_open("127.0.0.1", smtp_port), 30, "the frontend to listen")
        children = wait_for(lambda: c if len(c := children_of(up.pid)) == 4 else None, 10,
                            "4 children (shard, worker, mailbox, frontend)")
        os.kill(up.pid, signal.SIGKILL)
        up.wait(10)
        wait_for(lambda: not [pid for pid in children if alive(pid)], 20, "children to exit after a kill -9")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)


def test_up_on_built_in_defaults_is_what_make_run_starts(tmp_path: Path) -> None:
    """No configuration file at all: SMTP on 127.0.0.1:2525, POP3 on 1110, LMTP on 2424, spool under ./var,
    metrics from 9450."""
    for port in (2525, 1110, 2424, 5570, *range(9450, 9456)):
        assert not port_open("127.0.0.1", port), f"port {port} is taken: the defaults cannot be tested here"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTACLUSTER_")}
    env["PYTHONPATH"] = str(REPO)
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "cluster", "up"], stdout=log, stderr=subprocess.STDOUT,
                              cwd=tmp_path, env=env)
    try:
        # a shard, a mailbox node, and the frontends and workers scaled to this machine's CPUs
        ready = 2 + sum(up_processes(UpConfig()))
        wait_for(lambda: log_path.read_text().count("mtacluster: ready") >= ready, 30, f"{ready} ready lines")
        assert "smtp=127.0.0.1:2525" in log_path.read_text()
        assert "lmtp=127.0.0.1:2424 pop3=127.0.0.1:1110" in log_path.read_text()
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as client:
            assert client.ehlo()[0] == 250
        pop = poplib.POP3("127.0.0.1", 1110, timeout=10)
        assert pop.getwelcome().startswith(b"+OK")
        pop.quit()
        assert (tmp_path / "var" / "spool" / "shard-0").is_dir()
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert up.wait(30) == 0
        assert "mtacluster up: stopped" in log_path.read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
