"""One cluster per configuration (issue 11): a second `up` fails fast, a second shard on a spool is refused, and a
frontend listens only once its shards answer. Real processes, real sockets."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import REPO, Cluster, port_open, wait_for, write_config
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration


def up_config(path: Path, spool: Path, smtp_port: int, shard_port: int) -> Path:
    return write_config(path, {
        "smtp": {"listen": [f"127.0.0.1:{smtp_port}"]},
        "queue": {"shards": [f"tcp://127.0.0.1:{shard_port}"], "spool_dir": str(spool)},
        "metrics": {"listen": ""},
        "up": {"frontends": 1, "workers": 1, "mailbox": False},
    })


def test_a_second_up_fails_fast_and_says_why(tmp_path: Path) -> None:
    smtp_port, shard_port = free_port(), free_port()
    config = up_config(tmp_path / "up.toml", tmp_path / "spool", smtp_port, shard_port)
    log_path = tmp_path / "first.log"
    with log_path.open("wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "cluster", "up", "--config", str(config)], stdout=log,
                                 stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: log_path.read_text().count("mtacluster: ready") >= 3, 60,
                 f"the first cluster to be ready; log:\n{log_path.read_text()}")
        # The same configuration: the spool directory's lock says who runs it.
        second = subprocess.run([sys.executable, "-m", "cluster", "up", "--config", str(config)], cwd=REPO,
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1, second
        assert f"another `mtacluster up` (pid {first.pid}) is running" in second.stderr
        # Another spool directory, the same SMTP port: refused before a frontend could share the port.
        other = up_config(tmp_path / "other.toml", tmp_path / "other-spool", smtp_port, free_port())
        third = subprocess.run([sys.executable, "-m", "cluster", "up", "--config", str(other)], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
        assert third.returncode == 1, third
        assert f"SMTP address 127.0.0.1:{smtp_port} is already in use by another process" in third.stderr
        assert first.poll() is None and "restarting" not in log_path.read_text()
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:  # the first one still serves
            assert client.noop()[0] == 250
    finally:
        first.terminate()
        first.wait(30)


def test_a_second_shard_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, frontends=0, workers=0)
    try:
        cluster.start()
        holder = cluster.shard_process(0)
        # Same spool directory, another endpoint: only the spool lock stands in the way.
        sections = {**cluster.sections, "queue": {**cluster.sections["queue"],
                                                   "shards": [f"tcp://127.0.0.1:{free_port()}"]}}
        config = write_config(tmp_path / "second.toml", sections)
        second = subprocess.run([sys.executable, "-m", "cluster", "serve", "queue", "--config", str(config)],
                                cwd=REPO, capture_output=True, text=True, timeout=30)
        assert second.returncode == 1, second
        assert holder.process is not None
        assert f"is in use by another process (pid {holder.process.pid}): one shard per spool" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        cluster.stop()


def test_a_frontend_listens_only_once_its_shards_answer(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, frontends=0, workers=0, metrics=True)
    try:
        frontend = cluster.role("frontend").start()
        # The frontend runs and has looked at its shards (the gauge is set while it waits) ...
        wait_for(lambda: port_open(*_host_port(frontend.metrics_address)), 20, "the frontend's metrics listener")
        wait_for(lambda: "mtacluster_frontend_shards_reachable 0.0" in _scrape(frontend.metrics_address), 20,
                 "the frontend to look at its shards")
        # ... but takes no SMTP connection while no shard answers.
        assert not port_open("127.0.0.1", cluster.smtp_port)
        cluster.role("queue", "--shard", "0").start().wait_ready()
        frontend.wait_ready()
        with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as client:
            client.sendmail("a@sender.test", ["b@dest.test"], b"Subject: x\r\n\r\nhello\r\n")
    finally:
        cluster.stop()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _scrape(address: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""
