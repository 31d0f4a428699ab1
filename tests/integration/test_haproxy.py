"""Frontends behind a real HAProxy speaking the PROXY protocol (v1 and v2).

The relay policy and the Received header must see the real client address, not the balancer's.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.support.harness import Cluster, SmtpSink, port_open, wait_for
from tests.support.tooling import free_port, require_tool

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    sink = SmtpSink(tmp_path_factory.mktemp("sink") / "dump").start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, sink: SmtpSink) -> Iterator[Cluster]:
    # Only the real client 127.0.0.7 may relay; HAProxy itself (127.0.0.1) may not.
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), overrides={
        "delivery": {"smarthost": sink.address},
        # The outsider's sender domain exists nowhere: the sender checks are test_accounts_e2e.py's business.
        "smtp": {"proxy_protocol": True, "relay_networks": ["127.0.0.7/32"], "reject_unknown_sender_domain": False,
                 "spf": "off"}})
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module", params=["send-proxy", "send-proxy-v2"])
def haproxy_port(request: pytest.FixtureRequest, cluster: Cluster,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    haproxy = require_tool("haproxy")
    port = free_port()
    config = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    config.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend smtp_in
    bind 127.0.0.1:{port}
    default_backend mta
backend mta
    server frontend1 127.0.0.1:{cluster.smtp_port} {request.param}
""")
    process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 10, "haproxy to listen")
        yield port
    finally:
        process.terminate()
        process.wait(5)


def test_real_client_address_decides_relay_and_appears_in_received(haproxy_port: int, sink: SmtpSink) -> None:
    with smtplib.SMTP("127.0.0.1", haproxy_port, timeout=30, source_address=("127.0.0.8", 0)) as outsider:
        outsider.ehlo("outsider.test")
        outsider.mail("a@outsider.test")
        code, text = outsider.rcpt("b@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1")

    marker = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", haproxy_port, timeout=30, source_address=("127.0.0.7", 0)) as insider:
        insider.sendmail("a@inside.test", ["b@elsewhere.test"], f"Subject: {marker}\r\n\r\nvia haproxy\r\n".encode())
    message = wait_for(lambda: [m for m in sink.messages() if marker in m.text], 30, "the relayed message")[0]
    assert "([127.0.0.7])" in message.text.split("\n", 1)[0]


def test_connection_without_proxy_header_is_dropped(cluster: Cluster) -> None:
    with socket.create_connection(("127.0.0.1", cluster.smtp_port), timeout=15) as direct:
        direct.sendall(b"EHLO sneaky.test\r\n")
        assert direct.recv(1024) == b""  # closed without a word: no PROXY header, no SMTP
