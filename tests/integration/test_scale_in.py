"""Scaling frontends in under load behind a real HAProxy: no refused connection, nothing lost (issue 14).

Three frontends behind HAProxy, which checks each one's /readyz (100 ms apart, down at the first failure, no
connection retries: a refused connection would reach the client). Client threads send mail through HAProxy
without a pause while frontends 1 and 2 get SIGTERM. With `smtp.shutdown_grace` they say not ready at once,
keep listening and serving for the grace, then answer 421 4.3.2 to what is still open: every client session
must end normally, and every accepted message must reach the sink exactly once. A session held open on a
stopping frontend is still served during the grace (a message stored then is delivered), and gets 421 4.3.2
only after it.
"""

from __future__ import annotations

import smtplib
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import Cluster, RoleProcess, SmtpSink, port_open, wait_for
from tests.support.tooling import free_port, require_tool

pytestmark = pytest.mark.integration

GRACE = 2.0
CLIENTS = 4


def ready(process: RoleProcess) -> int:
    """The HTTP status of a frontend's /readyz (0 when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{process.metrics_address}/readyz", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


@pytest.fixture
def haproxy() -> Iterator[Path]:
    yield Path(require_tool("haproxy"))


def start_haproxy(binary: Path, directory: Path, port: int,
                  frontends: list[tuple[int, str]]) -> subprocess.Popen[bytes]:
    servers = "\n".join(f"    server f{i} 127.0.0.1:{smtp} check port {metrics.rpartition(':')[2]}"
                        for i, (smtp, metrics) in enumerate(frontends))
    config = directory / "haproxy.cfg"
    config.write_text(f"""
global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 0
frontend smtp_in
    bind 127.0.0.1:{port}
    default_backend mta
backend mta
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 100 fall 1 rise 1
{servers}
""")
    process = subprocess.Popen([str(binary), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open("127.0.0.1", port), 10, "haproxy to listen")
    return process


class Load:
    """Client threads sending two messages per session through HAProxy until told to stop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: list[str] = []
        self.errors: list[str] = []
        self.sessions = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as client:
                    for _ in range(2):
                        message_id = f"<{uuid.uuid4().hex}@load.test>"
                        client.sendmail("load@sender.test", ["r@dest.test"],
                                        f"Message-ID: {message_id}\r\nSubject: load\r\n\r\nbody\r\n".encode())
                        with self._lock:
                            self.accepted.append(message_id)
                with self._lock:
                    self.sessions += 1
            except (smtplib.SMTPException, OSError) as error:
                with self._lock:
                    self.errors.append(repr(error))


def test_frontends_scale_in_behind_haproxy_without_refusal_or_loss(tmp_path: Path, haproxy: Path) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    cluster = Cluster(tmp_path / "cluster", shards=1, frontends=0, workers=1, metrics=True, overrides={
        "delivery": {"smarthost": sink.address},
        "smtp": {"shutdown_grace": f"{GRACE:g}s", "relay_networks": ["127.0.0.0/8"]}})
    frontends = []
    for _ in range(3):
        process = cluster.role("frontend")
        process.env["MTACLUSTER_SMTP_LISTEN"] = f'["127.0.0.1:{free_port()}"]'
        frontends.append(process)
    ports = [int(p.env["MTACLUSTER_SMTP_LISTEN"].split(":")[1].rstrip('"]')) for p in frontends]
    balancer = None
    try:
        cluster.start()
        for process in frontends:
            process.start()
        for process in frontends:
            process.wait_ready()
        port = free_port()
        balancer = start_haproxy(haproxy, tmp_path, port, [(p, f.metrics_address) for p, f in zip(ports, frontends,
                                                                                                 strict=True)])
        held = smtplib.SMTP("127.0.0.1", ports[1], timeout=20)  # a session open on a frontend about to stop
        held.ehlo("held.test")
        with Load(port) as load:
            wait_for(lambda: load.sessions >= 15, 30, "sessions through haproxy before the scale-in")
            served_before = [f.metric("mtacluster_smtp_connections_total", listener="smtp") for f in frontends]
            stopping = frontends[1:]
            terminated = time.monotonic()
            for process in stopping:
                assert process.process is not None
                process.process.terminate()
            # Not ready at once.
            wait_for(lambda: all(ready(p) == 503 for p in stopping), 1.0, "/readyz 503 on the stopping frontends")
            # The held session is still served during the grace: a message stored now is delivered.
            assert held.noop()[0] == 250
            held.sendmail("held@sender.test", ["r@dest.test"], b"Message-ID: <held@load.test>\r\n\r\nheld\r\n")
            assert time.monotonic() - terminated < GRACE
            # Then, after the grace, 421 4.3.2.
            code, text = held.getreply()
            waited = time.monotonic() - terminated
            assert (code, text[:5]) == (421, b"4.3.2"), (code, text)
            assert waited >= GRACE * 0.9, f"421 after {waited:.2f}s, before the grace of {GRACE}s"
            for process in stopping:
                assert process.process is not None
                assert process.process.wait(15) == 0
            sessions_at_exit = load.sessions
            wait_for(lambda: load.sessions >= sessions_at_exit + 10, 30, "sessions on the remaining frontend")
        held.close()
        assert not load.errors, f"{len(load.errors)} client sessions failed: {load.errors[:5]}"
        assert all(n > 0 for n in served_before), served_before
        accepted = [*load.accepted, "<held@load.test>"]

        def delivered() -> Counter[str]:
            return Counter(m.message_id or "" for m in sink.messages())

        wait_for(lambda: set(accepted) <= set(delivered()), 60, f"all {len(accepted)} accepted messages at the sink",
                 interval=0.5)
        doubles = {k: n for k, n in delivered().items() if n > 1}
        assert not doubles, f"delivered more than once: {list(doubles)[:5]}"
        assert "answered 421 4.3.2" in frontends[1].log()
        print(f"scale-in 3 -> 1 under load: {load.sessions} sessions, {len(accepted)} messages accepted and "
              f"delivered once each, 0 refused; 421 on the held session {waited:.2f}s after SIGTERM")
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(5)
        cluster.stop()
        sink.stop()
