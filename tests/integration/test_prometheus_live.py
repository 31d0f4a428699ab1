"""The dashboard and the alert rules against a real Prometheus scraping a real cluster under a short load.

Starts smtp-sink (the smarthost and the MX host), dnsmasq (a test zone, so workers do MX lookups), the whole
cluster with `mtacluster up` (1 shard, 1 worker, 1 mailbox, 1 frontend; metrics ports printed on each "ready" line;
STARTTLS with a trustme certificate and a users file with one user), and Debian's `prometheus` scraping every
metrics port each second with deploy/prometheus/alerts.yml loaded. The load covers the paths the dashboard shows:
plain deliveries, MX routing, a permanent failure (bounce), a deferral, an oversized message, refused connections,
STARTTLS with one failed and one successful SMTP AUTH, and a local delivery read and deleted over POP3. Then every
PromQL expression of the dashboard (Grafana's variables substituted as Grafana would) must parse and return data,
and every alert rule must parse, load and evaluate.
"""

from __future__ import annotations

import json
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from cluster.users import add_user
from tests.support.harness import REPO, DnsServer, SmtpSink, port_open, wait_for, write_config
from tests.support.tooling import free_port, free_ports_in_a_row, require_tool

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "deploy" / "grafana" / "mtacluster.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
# What Grafana puts in place of its variables ("All" is ".*", which also matches series without the label).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$namespace": ".*", "$pod": ".*"}
READY_LINE = re.compile(r"mtacluster: ready role=(\w+) pid=\d+ .*?metrics=(\S+)")
PROCESSES = 4  # 1 shard, 1 worker, 1 mailbox, 1 frontend
NORMAL_MESSAGES = 12
MAX_MESSAGE_SIZE = 65536
# The one user of the users file: logs in with SMTP AUTH and reads the Maildir "reader" over POP3.
USER, PASSWORD = "reader@mailbox.test", "correct horse battery staple"


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400 for a bad query: the body says why
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.get("/api/v1/query", query=expr)
        return answer

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


def stop(process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@dataclass
class LiveCluster:
    sink: SmtpSink
    smtp_port: int
    pop3_port: int
    tls_client: ssl.SSLContext  # trusts the frontend's certificate
    maildir: Path  # USER's Maildir, where the "local" transport delivers mail for mailbox.test
    targets: dict[str, str]  # metrics address -> role
    prometheus: Prometheus
    log_path: Path


def issue_certificate(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    """The frontend's certificate chain and key, as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "live.test")
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return cert_file, key_file


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    prometheus_binary = require_tool("prometheus")
    base = tmp_path_factory.mktemp("prometheus-live")
    base.chmod(0o755)  # smtp-sink writes its dumps as "nobody"
    sink = SmtpSink(base / "sink").start()
    dns = DnsServer([("dns.test", "mx.dns.test", 10)], {"mx.dns.test": "127.0.0.1"}).start()
    smtp_port, pop3_port, lmtp_port = free_port(), free_port(), free_port()
    metrics_base = free_ports_in_a_row(PROCESSES)
    ca = trustme.CA()
    cert_file, key_file = issue_certificate(ca, base)
    users_file = base / "users"
    add_user(str(users_file), USER, PASSWORD)
    tls_client = ssl.create_default_context()
    ca.configure_trust(tls_client)
    config = write_config(base / "mtacluster.toml", {
        # Nobody may relay: the test domains are local domains, and mail to any other domain is refused.
        "smtp": {"hostname": "live.test", "listen": [f"127.0.0.1:{smtp_port}"], "max_message_size": MAX_MESSAGE_SIZE,
                 "max_connections_per_client": 3, "relay_networks": ["192.0.2.0/24"],
                 "local_domains": ["sink.test", "dns.test", "bounce.test", "defer.test", "mailbox.test"],
                 "tls_cert_file": str(cert_file), "tls_key_file": str(key_file),
                 # The load comes from origin.test, which the test zone does not have: no sender checks here.
                 "reject_unknown_sender_domain": False, "spf": "off"},
        "queue": {"shards": [f"tcp://127.0.0.1:{free_port()}"], "spool_dir": str(base / "spool"),
                  "heartbeat_interval": 0.2, "worker_timeout": 2},
        "delivery": {"smarthost": sink.address, "port": sink.port, "nameservers": [dns.address],
                     "connect_timeout": 2,
                     "transports": {"dns.test": "smtp:dns.test", "bounce.test": "error:5.1.1 no such user",
                                    "defer.test": f"smtp:[127.0.0.1]:{free_port()}", "mailbox.test": "local"}},
        "metrics": {"listen": f"127.0.0.1:{metrics_base}", "top_domains": ["sink.test"]},
        "auth": {"users_file": str(users_file)},
        # Plaintext USER/PASS is accepted from loopback clients, so the mailbox needs no certificate here.
        "mailbox": {"pop3_listen": [f"127.0.0.1:{pop3_port}"], "lmtp_listen": [f"127.0.0.1:{lmtp_port}"],
                    "nodes": [f"127.0.0.1:{lmtp_port}"], "maildir_root": str(base / "maildir")},
        "up": {"frontends": 1, "workers": 1, "mailbox": True},  # PROCESSES: the 4 roles
        # Deliverability panels: the normal messages outrun sink.test's rate (shaping delays), the refused
        # connections to defer.test suspend it (a reaction rule), and bounce.test's 5.1.1 is suppressed.
        "shaping": {"sink.test": {"max_message_rate": f"{NORMAL_MESSAGES - 2}/s"},
                    "defer.test": {"rules": [{"match": "refused", "action": "suspend", "duration": "1m"}]}},
        "suppression": {"ttl": "1h"},
    })
    log_path = base / "up.log"
    up: subprocess.Popen[bytes] | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        with log_path.open("wb") as log:
            up = subprocess.Popen([sys.executable, "-m", "cluster", "up", "--config", str(config)], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: len(READY_LINE.findall(log_path.read_text())) >= PROCESSES, 60,
                 f"{PROCESSES} ready lines from `mtacluster up`")
        targets = {address: role for role, address in READY_LINE.findall(log_path.read_text())}

        rules = base / "alerts.yml"
        shutil.copy(ALERTS, rules)
        (base / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "mtacluster", "static_configs": [
                {"targets": [address], "labels": {"role": role}} for address, role in targets.items()]}],
        }))
        web_port = free_port()
        with (base / "prometheus.log").open("wb") as prometheus_log:
            prometheus = subprocess.Popen(
                [prometheus_binary, f"--config.file={base / 'prometheus.yml'}",
                 f"--storage.tsdb.path={base / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web_port}"],
                stdout=prometheus_log, stderr=subprocess.STDOUT)
        server = Prometheus(f"http://127.0.0.1:{web_port}")
        wait_for(server.ready, 30, "prometheus to be ready")
        yield LiveCluster(sink, smtp_port, pop3_port, tls_client, base / "maildir" / "reader", targets, server,
                          log_path)
    finally:
        stop(prometheus)
        stop(up)
        dns.stop()
        sink.stop()


def send(port: int, sender: str, recipients: list[str], body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("load.test")
        client.noop()
        client.sendmail(sender, recipients, body)


def message(subject: str, size: int = 200) -> bytes:
    text = f"From: load@origin.test\r\nSubject: {subject}\r\n\r\n" + "x" * size + "\r\n"
    return text.encode()


def apply_load(live: LiveCluster) -> int:
    """Send mail along every path the dashboard shows; return the number of messages accepted."""
    for i in range(NORMAL_MESSAGES):
        send(live.smtp_port, "load@origin.test", [f"user{i}@sink.test"], message(f"normal {i}"))
    send(live.smtp_port, "load@origin.test", ["user@dns.test"], message("mx routed"))
    send(live.smtp_port, "load@origin.test", ["nobody@bounce.test"], message("bounces"))
    send(live.smtp_port, "load@origin.test", ["later@defer.test"], message("deferred"))
    send(live.smtp_port, "load@origin.test", [USER], message("for the mailbox"))
    accepted = NORMAL_MESSAGES + 4
    # Oversized, without a SIZE parameter (smtplib's sendmail would send one): refused at end of DATA with 552.
    # Then a relay attempt. Each is a "rejected" reason on the dashboard.
    with smtplib.SMTP("127.0.0.1", live.smtp_port, timeout=30) as client:
        client.ehlo("load.test")
        assert client.mail("load@origin.test")[0] == 250
        assert client.rcpt("big@sink.test")[0] == 250
        code, reply = client.data(message("too big", MAX_MESSAGE_SIZE * 2))
        assert code == 552, reply
        client.rset()
        client.help()
        # Relaying is refused at RCPT.
        assert client.mail("load@origin.test")[0] == 250
        assert client.rcpt("someone@elsewhere.example")[0] // 100 == 5
    authenticate(live)
    # Last, as the refused connections may count against the client's limit for a moment after they close:
    # more connections than smtp.max_connections_per_client, so the last ones are refused.
    held = []
    try:
        for _ in range(5):
            held.append(socket.create_connection(("127.0.0.1", live.smtp_port), timeout=10))
        for sock in held:
            sock.recv(512)
    finally:
        for sock in held:
            sock.close()
    return accepted


def authenticate(live: LiveCluster) -> None:
    """STARTTLS, then one SMTP AUTH that fails (wrong password) and one that succeeds."""
    with smtplib.SMTP("127.0.0.1", live.smtp_port, timeout=30) as client:
        client.ehlo("load.test")
        client.starttls(context=live.tls_client)
        client.ehlo("load.test")
        client.user, client.password = USER, "wrong password"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("PLAIN", client.auth_plain)
        assert refused.value.smtp_code == 535
        client.password = PASSWORD
        assert client.auth("PLAIN", client.auth_plain)[0] == 235


def read_mailbox(live: LiveCluster) -> None:
    """Wait for the local delivery to USER's Maildir, then log in over POP3, retrieve it and delete it."""
    def delivered() -> bool:
        return any(any((live.maildir / sub).glob("*")) for sub in ("new", "cur") if (live.maildir / sub).is_dir())

    wait_for(delivered, 30, f"a message in the Maildir {live.maildir}", interval=0.1)
    client = poplib.POP3("127.0.0.1", live.pop3_port, timeout=30)
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        count, _size = client.stat()
        assert count == 1
        _response, lines, _octets = client.retr(1)
        assert b"Subject: for the mailbox" in lines
        client.dele(1)
    finally:
        client.quit()


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], substitute(t["expr"])) for p in panels if p["type"] != "row" for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def loaded(live: LiveCluster) -> LiveCluster:
    accepted = apply_load(live)
    # The normal messages and the MX-routed one (the bounce's DSN may still be on its way).
    live.sink.wait_for_messages(NORMAL_MESSAGES + 1, timeout=60)
    read_mailbox(live)
    server = live.prometheus

    def scraped_everything() -> bool:
        answer = server.query("sum(mtacluster_smtp_messages_accepted_total)")
        result = answer.get("data", {}).get("result", [])
        return bool(result) and float(result[0]["value"][1]) >= accepted

    def every_target_scraped() -> bool:
        targets = server.get("/api/v1/targets")["data"]["activeTargets"]
        return len(targets) == len(live.targets) and all(t["health"] != "unknown" for t in targets)

    wait_for(every_target_scraped, 30, "prometheus to scrape every target once", interval=0.5)
    wait_for(scraped_everything, 30, "prometheus to scrape the accepted messages", interval=0.5)
    return live


def test_every_target_is_up(loaded: LiveCluster) -> None:
    answer = loaded.prometheus.get("/api/v1/targets")
    health = {t["labels"]["instance"]: t["health"] for t in answer["data"]["activeTargets"]}
    assert health == {address: "up" for address in loaded.targets}
    assert sorted(loaded.targets.values()) == ["frontend", "mailbox", "queue", "worker"]


def test_every_dashboard_query_parses_and_returns_data(loaded: LiveCluster) -> None:
    server = loaded.prometheus
    queries = dashboard_queries()
    for title, expr in queries:
        answer = server.query(expr)
        assert answer["status"] == "success", f"{title}: {expr}: {answer.get('error')}"

    def empty() -> list[str]:
        return [f"{title}: {expr}" for title, expr in queries if not server.query(expr)["data"]["result"]]

    # Rates need two samples after the load; give the scrapes a few more seconds before reporting.
    missing: list[str] = []

    def all_have_data() -> bool:
        missing[:] = empty()
        return not missing

    try:
        wait_for(all_have_data, 20, "every dashboard query to return data", interval=1)
    except AssertionError:
        pytest.fail("dashboard queries without data:\n" + "\n".join(missing))


def test_every_alert_rule_parses_loads_and_evaluates(loaded: LiveCluster) -> None:
    server = loaded.prometheus
    for rule in alert_rules():
        answer = server.query(rule["expr"])
        assert answer["status"] == "success", f"{rule['alert']}: {answer.get('error')}"

    def evaluated() -> dict[str, str] | None:
        groups = server.get("/api/v1/rules")["data"]["groups"]
        health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        return health if health and "unknown" not in health.values() else None

    health = wait_for(evaluated, 15, "prometheus to evaluate every rule")
    assert health == {rule["alert"]: "ok" for rule in alert_rules()}


def test_no_alert_fires_on_a_healthy_cluster(loaded: LiveCluster) -> None:
    # The load is healthy apart from its deliberate failures, which stay far below every threshold and `for`.
    alerts = loaded.prometheus.get("/api/v1/alerts")["data"]["alerts"]
    assert [a for a in alerts if a["state"] == "firing"] == []


def test_every_metrics_port_answers_health_and_readiness(loaded: LiveCluster) -> None:
    for address in loaded.targets:
        host, port = address.rsplit(":", 1)
        assert port_open(host, int(port))
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
                assert response.status == 200, f"{address}{path}"


def test_promtool_check_metrics_passes_on_every_role(loaded: LiveCluster) -> None:
    promtool = require_tool("promtool")
    for address, role in loaded.targets.items():
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            exposition = response.read()
        assert b"mtacluster_build_info{" in exposition and f'role="{role}"'.encode() in exposition
        check = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
        assert check.returncode == 0, f"{role} at {address}: {check.stdout.decode()}{check.stderr.decode()}"
