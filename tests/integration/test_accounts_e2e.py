"""Accounts on a real cluster: two queue shards, a worker, two frontends on two ports, dnsmasq serving a test zone
(MX, A, TXT/SPF records, a null MX and a SERVFAIL domain), smtp-sink as the smarthost, and real clients
(swaks with --tls/--auth, smtplib).

What it shows: sender ownership after AUTH (553 5.7.1); a disabled user gets the same 535 5.7.8 as a wrong
password, and the log says why; failed AUTH from one address is counted across sessions and frontends and
blocks AUTH on both (421 4.7.0) until the window passes; port-25 checks (unknown local user 550 5.1.1, unknown
sender domain 550 5.1.8, null MX 550 5.7.27, DNS trouble 450 4.1.8, SPF fail 550 5.7.23, SPF temperror
451 4.7.24, Received-SPF on accepted mail); a daily limit stays exact when one user's sessions race on both
frontends; a count survives a restart and a kill -9 of the user's shard, and while that shard is down the user
gets 451 4.3.0, never "allow".
"""

from __future__ import annotations

import concurrent.futures
import json
import poplib
import re
import smtplib
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from cluster.bus.ring import shard_for_key
from cluster.users import add_user, set_active
from tests.support import REPO
from tests.support.harness import Cluster, DnsServer, RoleProcess, SmtpSink, wait_for, write_config
from tests.support.tooling import free_port, require_tool

pytestmark = pytest.mark.integration

PASSWORD = "a long enough password"
OUTSIDER = "127.0.0.5"  # outside relay_networks (127.0.0.1/32)
RACE_LIMIT = 4
DURABLE_LIMIT = 3
ZONE_TXT = {
    "pass.test": ["v=spf1 ip4:127.0.0.0/8 -all"],
    "fail.test": ["v=spf1 ip4:192.0.2.1 -all"],
    "temp.test": ["v=spf1 include:servfail.test -all"],
}


@dataclass
class Setup:
    cluster: Cluster
    sink: SmtpSink
    ports: tuple[int, int]
    users: Path
    context: ssl.SSLContext
    frontend_logs: list[RoleProcess]
    pop3: RoleProcess
    pop3_port: int
    submissions_port: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("accounts")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "mta.test")
    cert_file, key_file = base / "tls.crt", base / "tls.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    users = base / "users"
    add_user(str(users), "alice@example.org", PASSWORD, addresses=("@pass.test",))
    add_user(str(users), "bob@example.org", PASSWORD)
    add_user(str(users), "racer@example.org", PASSWORD, messages_per_day=RACE_LIMIT)
    add_user(str(users), "fanout@example.org", PASSWORD, recipients_per_day=3)
    add_user(str(users), "durable@example.org", PASSWORD, messages_per_day=DURABLE_LIMIT)
    dns = DnsServer(mx=[("pass.test", "mx.pass.test", 10), ("fail.test", "mx.pass.test", 10)],
                    hosts={"mx.pass.test": "127.0.0.1", "temp.test": "127.0.0.1", "aonly.test": "127.0.0.1"},
                    txt=ZONE_TXT).start()
    sink = SmtpSink().start()
    second_port, submissions_port, pop3_port, lmtp_port = free_port(), free_port(), free_port(), free_port()
    cluster = Cluster(base / "cluster", shards=2, frontends=1, overrides={
        "smtp": {"relay_networks": ["127.0.0.1/32"], "tls_cert_file": str(cert_file), "tls_key_file": str(key_file),
                 "inject_timeout": 4, "max_auth_failures": 2, "local_domains": ["example.org", "hosted.test"]},
        "auth": {"users_file": str(users), "max_failures_per_client": 3, "failure_window": 4},
        "dns": {"nameservers": [dns.address], "timeout": 3},
        "delivery": {"smarthost": sink.address, "transports": {"example.org": "local"}},
        "aliases": {"sales@example.org": ["alice@example.org"]},
        "mailbox": {"pop3_listen": [f"127.0.0.1:{pop3_port}"], "lmtp_listen": [f"127.0.0.1:{lmtp_port}"],
                    "nodes": [f"127.0.0.1:{lmtp_port}"], "maildir_root": str(base / "maildir")},
    })
    # The second frontend listens on its own port, so a test can choose which frontend a connection reaches.
    sections = {name: dict(values) for name, values in cluster.sections.items()}
    sections["smtp"]["listen"] = [f"127.0.0.1:{second_port}"]
    sections["smtp"]["submissions_listen"] = [f"127.0.0.1:{submissions_port}"]  # RFC 8314 implicit TLS
    second_config = write_config(cluster.directory / "frontend2.toml", sections)
    try:
        cluster.start()
        second = RoleProcess("frontend", ["serve", "frontend", "--config", str(second_config)],
                             cluster.directory / "frontend-second.log")
        cluster.processes.append(second)
        second.start().wait_ready()
        pop3 = cluster.role("mailbox")
        pop3.start().wait_ready()
        yield Setup(cluster, sink, (cluster.smtp_port, second_port), users, context,
                    [p for p in cluster.processes if p.role == "frontend"], pop3, pop3_port, submissions_port)
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        sink.stop()
        dns.stop()


def session(setup: Setup, frontend: int = 0, source: str = OUTSIDER) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", setup.ports[frontend], timeout=20, source_address=(source, 0))
    client.ehlo("client.test")
    return client


def logged_in(setup: Setup, user: str, frontend: int = 0, source: str = OUTSIDER) -> smtplib.SMTP:
    client = session(setup, frontend, source)
    client.starttls(context=setup.context)
    client.ehlo("client.test")
    client.login(user, PASSWORD)
    return client


def reply(answer: tuple[int, bytes]) -> str:
    return f"{answer[0]} {answer[1].decode()}"


def frontend_logs(setup: Setup) -> str:
    return "\n".join(p.log() for p in setup.frontend_logs)


def test_swaks_submission_and_sender_login_match(setup: Setup) -> None:
    swaks = require_tool("swaks")

    def run(sender: str, *tls: str, port: int = setup.ports[1]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [swaks, "--server", f"127.0.0.1:{port}", "--local-interface", OUTSIDER, *tls,
             "--auth", "PLAIN", "--auth-user", "alice@example.org", "--auth-password", PASSWORD,
             "--from", sender, "--to", "friend@elsewhere.test", "--helo", "client.test"],
            capture_output=True, text=True, timeout=60, check=False)

    own = run("alice@example.org", "--tls")
    assert own.returncode == 0, own.stdout
    in_domain = run("anyone@pass.test", "--tls")  # "@pass.test" in her addresses
    assert in_domain.returncode == 0, in_domain.stdout
    other = run("bob@example.org", "--tls")
    assert "553 5.7.1 Sender address rejected: not owned by user alice@example.org" in other.stdout
    assert other.returncode != 0
    implicit = run("alice@example.org", "--tlsc", port=setup.submissions_port)  # RFC 8314: TLS from the first byte
    assert implicit.returncode == 0, implicit.stdout
    other_implicit = run("bob@example.org", "--tlsc", port=setup.submissions_port)
    assert "553 5.7.1 Sender address rejected: not owned by user alice@example.org" in other_implicit.stdout
    senders = sorted(m.sender for m in setup.sink.wait_for_messages(3))
    assert senders == ["alice@example.org", "alice@example.org", "anyone@pass.test"]


def test_disabled_user_gets_the_same_535_and_the_log_says_why(setup: Setup) -> None:
    set_active(str(setup.users), "bob@example.org", False)
    disabled = auth_plain(setup, 1, "127.0.0.5", "bob@example.org", PASSWORD)
    wrong = auth_plain(setup, 1, "127.0.0.6", "alice@example.org", "not her password")
    assert disabled == wrong == "535 5.7.8 Authentication credentials invalid"
    wait_for(lambda: "user=bob@example.org client=127.0.0.5 reason=disabled" in frontend_logs(setup), 10,
             "the log line saying why bob's login failed")
    assert "user=alice@example.org client=127.0.0.6 reason=bad_password" in frontend_logs(setup)
    # POP3 refuses the disabled account too (from loopback, where USER/PASS need no STLS), with the same answer
    # as a wrong password, and says why in its log.
    assert pop3_login(setup, "bob@example.org", PASSWORD) == pop3_login(setup, "bob@example.org", "wrong one")
    assert pop3_login(setup, "bob@example.org", PASSWORD).startswith("-ERR")
    assert "user='bob@example.org' client=127.0.0.1 reason=disabled" in setup.pop3.log()
    # Enabled again: the running frontends and the pop3 role see it without a restart.
    set_active(str(setup.users), "bob@example.org", True)
    assert auth_plain(setup, 0, "127.0.0.7", "bob@example.org", PASSWORD).startswith("235 2.7.0")
    assert pop3_login(setup, "bob@example.org", PASSWORD).startswith("+OK")


def pop3_login(setup: Setup, user: str, password: str) -> str:
    client = poplib.POP3("127.0.0.1", setup.pop3_port, timeout=10)
    try:
        client.user(user)
        return client.pass_(password).decode()
    except poplib.error_proto as exc:
        return str(exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc.args[0])
    finally:
        client.close()


def auth_plain(setup: Setup, frontend: int, source: str, user: str, password: str) -> str:
    """One AUTH PLAIN over STARTTLS in a new session: the reply."""
    client = session(setup, frontend, source)
    try:
        client.starttls(context=setup.context)
        client.ehlo("client.test")
        return reply(client.docmd("AUTH", "PLAIN " + _plain(user, password)))
    finally:
        client.close()


def test_password_guessing_is_blocked_on_every_frontend_until_the_window_passes(setup: Setup) -> None:
    guesser = "127.0.0.9"
    # auth.max_failures_per_client = 3 within 4 seconds, counted across sessions and frontends.
    assert auth_plain(setup, 0, guesser, "alice@example.org", "guess 1").startswith("535 5.7.8")
    assert auth_plain(setup, 1, guesser, "alice@example.org", "guess 2").startswith("535 5.7.8")
    blocked = "421 4.7.0 Too many failed authentication attempts from your address, try again later"
    assert auth_plain(setup, 0, guesser, "alice@example.org", "guess 3") == blocked  # the third failure blocks
    assert auth_plain(setup, 1, guesser, "alice@example.org", PASSWORD) == blocked
    assert auth_plain(setup, 0, guesser, "alice@example.org", PASSWORD) == blocked
    # Another address is not affected; the guesser may log in again once the window has passed.
    assert auth_plain(setup, 1, "127.0.0.10", "alice@example.org", PASSWORD).startswith("235")
    wait_for(lambda: auth_plain(setup, 1, guesser, "alice@example.org", PASSWORD).startswith("235"), 15,
             "AUTH to be allowed again after auth.failure_window", interval=0.5)


def _plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.mark.parametrize(("sender", "expected"), [
    ("someone@nothere.test", "550 5.1.8"),
    ("someone@nullmx.test", "550 5.7.27"),
    ("someone@servfail.test", "450 4.1.8"),
    ("someone@fail.test", "550 5.7.23"),
    ("someone@temp.test", "451 4.7.24"),
    ("someone@pass.test", "250 2.1.0"),
    ("someone@aonly.test", "250 2.1.0"),  # no MX, an A record: a mail domain; no SPF record: "none"
])
def test_port_25_sender_checks(setup: Setup, sender: str, expected: str) -> None:
    client = session(setup, 0)
    try:
        assert reply(client.docmd("MAIL", f"FROM:<{sender}>")).startswith(expected)
    finally:
        client.close()


def test_port_25_recipient_checks_and_received_spf(setup: Setup) -> None:
    client = session(setup, 1)
    client.mail("someone@pass.test")
    assert reply(client.rcpt("nobody@example.org")) == ("550 5.1.1 <nobody@example.org>: Recipient address "
                                                         "rejected: User unknown")
    for existing in ("alice@example.org", "Postmaster@example.org", "sales@example.org"):
        assert client.rcpt(existing)[0] == 250, existing
    client.rset()
    client.mail("someone@pass.test")
    assert client.rcpt("guest@hosted.test")[0] == 250  # a local domain routed by SMTP: not checked
    assert client.data(b"Subject: spf\r\n\r\nhello\r\n")[0] == 250
    client.quit()
    [message] = wait_for(lambda: [m for m in setup.sink.messages() if m.recipients == ["guest@hosted.test"]], 30,
                         "the message to guest@hosted.test at the sink")
    first = message.text.split("\n", 1)[0]
    assert first.lower().startswith("received-spf: pass ") and "client-ip=127.0.0.5" in first  # RFC 7208 9.1


def _send_one(setup: Setup, user: str, frontend: int, start: threading.Barrier) -> str:
    client = logged_in(setup, user, frontend)
    try:
        start.wait(20)
        code, text = client.mail(user)
        if code != 250:
            return f"{code} {text.decode()}"
        code, text = client.rcpt("friend@elsewhere.test")
        if code != 250:
            return f"{code} {text.decode()}"
        code, text = client.data(b"Subject: race\r\n\r\nrace\r\n")
        return f"{code} {text.decode()}"
    finally:
        client.close()


def test_daily_limit_is_exact_when_sessions_race_on_both_frontends(setup: Setup) -> None:
    attempts = 12
    start = threading.Barrier(attempts)
    with concurrent.futures.ThreadPoolExecutor(attempts) as pool:
        results = list(pool.map(lambda n: _send_one(setup, "racer@example.org", n % 2, start), range(attempts)))
    accepted = [r for r in results if r.startswith("250")]
    refused = [r for r in results if not r.startswith("250")]
    assert len(accepted) == RACE_LIMIT, results
    assert all(r.startswith(f"450 4.7.1 daily sending limit reached ({RACE_LIMIT} messages") for r in refused)
    wait_for(lambda: len([m for m in setup.sink.messages() if m.sender == "racer@example.org"]) >= RACE_LIMIT, 30,
             "the accepted messages at the sink")
    assert len([m for m in setup.sink.messages() if m.sender == "racer@example.org"]) == RACE_LIMIT
    show = subprocess.run([sys.executable, "-m", "cluster", "user", "show", "racer@example.org", "--json",
                           "--config", str(setup.cluster.config_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=30, check=True)
    facts = json.loads(show.stdout)
    assert facts["usage_24h"]["messages"] == RACE_LIMIT and facts["messages_per_day"] == RACE_LIMIT


def test_recipient_limit_refuses_at_rcpt(setup: Setup) -> None:
    client = logged_in(setup, "fanout@example.org", 0)
    client.mail("fanout@example.org")
    answers = [reply(client.rcpt(f"r{n}@elsewhere.test")) for n in range(4)]
    assert [a[:3] for a in answers] == ["250", "250", "250", "450"]
    assert answers[3] == "450 4.7.1 daily sending limit reached (3 recipients per 24 hours)"
    assert client.data(b"Subject: three\r\n\r\nthree\r\n")[0] == 250
    client.quit()


def test_count_survives_restart_and_kill9_of_the_users_shard(setup: Setup) -> None:
    user = "durable@example.org"
    owner = shard_for_key(user, setup.cluster.sections["queue"]["shards"])
    shard = setup.cluster.shard_process(owner)

    def send(client: smtplib.SMTP) -> str:
        try:
            answer = client.mail(user)
            if answer[0] != 250:
                return reply(answer)
            client.rcpt("friend@elsewhere.test")
            return reply(client.data(b"Subject: durable\r\n\r\ndurable\r\n"))
        finally:
            client.close()

    assert send(logged_in(setup, user, 0)).startswith("250")  # the first of 3
    shard.stop()
    shard.start().wait_ready()
    wait_for(lambda: send(logged_in(setup, user, 1)).startswith("250"), 30, "the second message, after a restart")
    waiting = logged_in(setup, user, 0)  # logged in before the kill (AUTH may ask the same shard)
    shard.kill9()
    down = send(waiting)
    assert down.startswith("451 4.3.0"), down  # the user's shard is down: never "allow"
    shard.start().wait_ready()
    wait_for(lambda: send(logged_in(setup, user, 1)).startswith("250"), 30, "the third message, after kill -9")
    assert re.match(r"450 4\.7\.1 daily sending limit reached \(3 messages", send(logged_in(setup, user, 0)))
