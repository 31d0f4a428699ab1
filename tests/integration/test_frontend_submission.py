"""Message submission on real frontends: port 587 style (STARTTLS, RFC 6409) and 465 style (implicit TLS,
RFC 8314), against smtplib and swaks, with certificates made by trustme.

What these prove: MAIL before AUTH gets 530 5.7.0 on the submission listeners only; AUTH needs TLS (538); a
submitted message gets Message-ID and Date when it has none, and mail on the port 25 listener is stored byte for
byte as sent; implicit TLS starts with the handshake, also behind a PROXY protocol header; the session's policy
hooks are asked at AUTH, MAIL, RCPT and end of DATA and their refusals are what the client sees; `mtacluster up`
listens on all three listeners; the `listener` metric label tells the traffic apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client import REGISTRY

from cluster.config import config_from_dict
from cluster.frontend.policy import SessionFacts, SessionPolicy
from cluster.frontend.server import Frontend
from cluster.smtp import replies
from cluster.smtp.address import Address
from cluster.smtp.events import MessageReceived
from cluster.smtp.replies import Reply
from cluster.users import add_user
from tests.support import REPO
from tests.support.harness import SmtpSink, wait_for, write_config
from tests.support.scripted_shard import ScriptedShard, stored
from tests.support.tooling import free_port, require_tool

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice@example.org", "correct horse battery staple"
BARE = b"From: alice@example.org\r\nTo: bob@elsewhere.test\r\nSubject: no id, no date\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("pki")
    cert = ca.issue_cert("127.0.0.1", "mta.test")
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return str(cert_file), str(key_file)


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("users") / "users")
    add_user(path, USER, PASSWORD)
    return path


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Ports:
    def __init__(self) -> None:
        self.smtp, self.submission, self.submissions = free_port(), free_port(), free_port()


@contextlib.asynccontextmanager
async def frontend(pki: tuple[str, str], users_file: str, checks: tuple[SessionPolicy, ...] = (),
                   **smtp: object) -> AsyncIterator[tuple[Ports, ScriptedShard]]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    shard = ScriptedShard(endpoint, stored)
    serving = asyncio.create_task(shard.serve())
    ports = Ports()
    config = config_from_dict({
        "smtp": {"hostname": "mta.test", "listen": [f"127.0.0.1:{ports.smtp}"],
                 "submission_listen": [f"127.0.0.1:{ports.submission}"],
                 "submissions_listen": [f"127.0.0.1:{ports.submissions}"],
                 "relay_networks": ["127.0.0.1/32"], "tls_cert_file": pki[0], "tls_key_file": pki[1],
                 "reject_unknown_sender_domain": False, "spf": "off", **smtp},
        # The scripted shard answers only injects and pings: no cluster-wide AUTH failure count and no daily
        # limits here (test_accounts_e2e.py tests both against real shards), no sender DNS checks.
        "queue": {"shards": [endpoint]}, "auth": {"users_file": users_file, "max_failures_per_client": 0},
        "limits": {"messages_per_day": 0, "recipients_per_day": 0}}, environ={})
    server = Frontend(config, checks)
    stop = asyncio.Event()
    running = asyncio.create_task(server.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not server.is_ready():
            assert asyncio.get_running_loop().time() < deadline, "frontend never became ready"
            await asyncio.sleep(0.02)
        assert server.addresses("submissions") == [("127.0.0.1", ports.submissions)]
        yield ports, shard
    finally:
        stop.set()
        await running
        serving.cancel()
        shard.socket.close(linger=0)


def submit_on_587(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("laptop.test")
        seen["before_tls"] = dict(client.esmtp_features)
        seen["mail_before_tls"] = client.docmd("MAIL", "FROM:<alice@example.org>")
        seen["auth_before_tls"] = client.docmd("AUTH", "PLAIN AGFsaWNlAHB3")
        client.starttls(context=context)
        client.ehlo("laptop.test")
        seen["after_tls"] = dict(client.esmtp_features)
        seen["mail_before_auth"] = client.docmd("MAIL", "FROM:<alice@example.org>")
        seen["auth"] = client.login(USER, PASSWORD)
        seen["mail"] = client.mail("alice@example.org")
        seen["rcpt"] = client.rcpt("bob@elsewhere.test")
        seen["data"] = client.data(BARE)
    return seen


async def test_submission_needs_tls_then_auth_and_completes_the_header(
        ca: trustme.CA, pki: tuple[str, str], users_file: str) -> None:
    accepted = sample("mtacluster_smtp_messages_accepted_total", listener="submission")
    refused = sample("mtacluster_smtp_messages_rejected_total", reason="auth_required", listener="submission")
    async with frontend(pki, users_file) as (ports, shard):
        seen = await asyncio.to_thread(submit_on_587, ports.submission, client_context(ca))
    assert "starttls" in seen["before_tls"] and "auth" not in seen["before_tls"]
    # The client is inside relay_networks: on the submission port that does not replace AUTH.
    assert seen["mail_before_tls"] == (530, b"5.7.0 Authentication required")
    assert seen["auth_before_tls"] == (538, b"5.7.11 Encryption required for requested authentication mechanism")
    assert seen["after_tls"]["auth"] == " PLAIN LOGIN"
    assert "chunking" in seen["after_tls"]  # smtp.chunking defaults to true
    assert seen["mail_before_auth"] == (530, b"5.7.0 Authentication required")
    assert seen["auth"] == (235, b"2.7.0 Authentication successful")
    # The replies production sends, from the one catalogue.
    assert seen["mail"] == (replies.SENDER_OK.code, f"{replies.SENDER_OK.enhanced} {replies.SENDER_OK.text}".encode())
    assert seen["rcpt"] == (250, b"2.1.5 Recipient ok")
    assert seen["data"] == (250, b"2.0.0 Ok: queued as Q" + str(shard.injects[0].req).encode())
    [inject] = shard.injects
    header, _, body = inject.body.partition(b"\r\n\r\n")
    assert b"with ESMTPSA id " in header
    assert header.count(b"\r\nMessage-ID: <") == 1 and header.count(b"\r\nDate: ") == 1
    assert body == b"hello\r\n"
    assert sample("mtacluster_smtp_messages_accepted_total", listener="submission") == accepted + 1
    assert sample("mtacluster_smtp_messages_rejected_total", reason="auth_required",
                  listener="submission") == refused + 2


def send_on_25(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("mx.sender.test")
        assert client.mail("someone@sender.test") == replies_tuple(replies.SENDER_OK)
        assert client.rcpt("bob@elsewhere.test")[0] == 250
        return client.data(BARE)


def replies_tuple(reply: Reply) -> tuple[int, bytes]:
    return reply.code, f"{reply.enhanced} {reply.text}".encode()


async def test_mail_on_port_25_is_stored_as_sent(pki: tuple[str, str], users_file: str) -> None:
    async with frontend(pki, users_file) as (ports, shard):
        answer = await asyncio.to_thread(send_on_25, ports.smtp)
    assert answer[0] == 250
    [inject] = shard.injects
    received, _, rest = inject.body.partition(b"\r\nFrom: ")
    assert received.startswith(b"Received: from mx.sender.test ([127.0.0.1])")
    assert b"From: " + rest == BARE


def submit_on_465(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=context) as client:
        client.ehlo("phone.test")
        seen["features"] = dict(client.esmtp_features)
        seen["mail_before_auth"] = client.docmd("MAIL", "FROM:<alice@example.org>")
        seen["auth"] = client.login(USER, PASSWORD)
        seen["refused"] = client.sendmail("alice@example.org", ["bob@elsewhere.test"], BARE)
    return seen


def plaintext_on_465(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"EHLO plaintext.test\r\n")
        return plain.recv(100)


async def test_submissions_is_tls_from_the_first_byte(ca: trustme.CA, pki: tuple[str, str],
                                                       users_file: str) -> None:
    handshakes = sample("mtacluster_smtp_tls_handshakes_total", result="success")
    failures = sample("mtacluster_smtp_tls_handshakes_total", result="failure")
    connections = sample("mtacluster_smtp_connections_total", listener="submissions")
    async with frontend(pki, users_file) as (ports, shard):
        seen = await asyncio.to_thread(submit_on_465, ports.submissions, client_context(ca))
        # A plaintext client gets no SMTP greeting: its bytes are no TLS handshake, and the connection closes.
        assert await asyncio.to_thread(plaintext_on_465, ports.submissions) == b""
    assert "auth" in seen["features"] and "starttls" not in seen["features"]
    assert seen["mail_before_auth"] == (530, b"5.7.0 Authentication required")
    assert seen["auth"][0] == 235 and seen["refused"] == {}
    [inject] = shard.injects
    assert b"with ESMTPSA id " in inject.body and b"\r\nMessage-ID: <" in inject.body
    assert sample("mtacluster_smtp_tls_handshakes_total", result="success") == handshakes + 1
    assert sample("mtacluster_smtp_tls_handshakes_total", result="failure") == failures + 1
    assert sample("mtacluster_smtp_connections_total", listener="submissions") == connections + 2


def proxied_tls_session(port: int, context: ssl.SSLContext) -> list[bytes]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 465\r\n")
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        file = tls.makefile("rb")
        lines = [file.readline()]
        tls.sendall(b"EHLO behind.proxy.test\r\nMAIL FROM:<x@y.test>\r\nQUIT\r\n")
        while not (line := file.readline()).startswith(b"221"):
            lines.append(line)
        return lines


async def test_implicit_tls_behind_a_proxy_header(ca: trustme.CA, pki: tuple[str, str], users_file: str) -> None:
    async with frontend(pki, users_file, proxy_protocol=True) as (ports, _):
        lines = await asyncio.to_thread(proxied_tls_session, ports.submissions, client_context(ca))
    assert lines[0].startswith(b"220 mta.test ESMTP")
    assert lines[1] == b"250-mta.test Hello behind.proxy.test\r\n"
    assert lines[-1] == b"530 5.7.0 Authentication required\r\n"


class Recorder(SessionPolicy):
    """A check as accounts will plug in: records what it was asked, refuses one recipient."""

    REFUSAL = Reply.of(550, "5.1.1", "<nobody@elsewhere.test>: Recipient address rejected: User unknown")

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def check_auth(self, facts: SessionFacts) -> Reply | None:
        self.asked.append(f"auth tls={facts.tls} listener={facts.listener}")
        return None

    async def check_login(self, facts: SessionFacts, username: str, verified: bool) -> Reply | None:
        self.asked.append(f"login {username} {verified}")
        return None

    async def check_mail(self, facts: SessionFacts, sender: Address | None,
                         params: dict[str, str | None]) -> Reply | None:
        self.asked.append(f"mail {sender} user={facts.user}")
        return None

    async def check_rcpt(self, facts: SessionFacts, recipient: Address) -> Reply | None:
        self.asked.append(f"rcpt {recipient} sender={facts.sender} before={len(facts.recipients)}")
        return self.REFUSAL if recipient.local_part == "nobody" else None

    async def check_message(self, facts: SessionFacts, message: MessageReceived) -> Reply | None:
        self.asked.append(f"message {len(message.recipients)}")
        return None


def hooked_session(port: int, context: ssl.SSLContext) -> list[tuple[int, bytes]]:
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=context) as client:
        client.ehlo("laptop.test")
        client.login(USER, PASSWORD)
        client.mail("alice@example.org")
        answers = [client.rcpt("bob@elsewhere.test"), client.rcpt("nobody@elsewhere.test")]
        answers.append(client.data(BARE))
    return answers


async def test_policy_hooks_are_asked_at_every_decision(ca: trustme.CA, pki: tuple[str, str],
                                                         users_file: str) -> None:
    recorder = Recorder()
    async with frontend(pki, users_file, checks=(recorder,)) as (ports, _):
        answers = await asyncio.to_thread(hooked_session, ports.submissions, client_context(ca))
    assert answers[1] == replies_tuple(Recorder.REFUSAL)
    assert answers[0][0] == 250 and answers[2][0] == 250
    assert recorder.asked == [
        "auth tls=True listener=submissions",
        f"login {USER} True",
        f"mail alice@example.org user={USER}",
        "rcpt bob@elsewhere.test sender=alice@example.org before=0",
        "rcpt nobody@elsewhere.test sender=alice@example.org before=1",
        "message 1",
    ]


# --- real processes: `mtacluster up` with all three listeners, swaks as the mail client ---

@pytest.fixture
def up_cluster(tmp_path: Path, pki: tuple[str, str], users_file: str) -> Iterator[tuple[Ports, SmtpSink]]:
    sink = SmtpSink(tmp_path / "sink").start()
    ports = Ports()
    config = write_config(tmp_path / "up.toml", {
        "smtp": {"hostname": "mta.test", "listen": [f"127.0.0.1:{ports.smtp}"],
                 "submission_listen": [f"127.0.0.1:{ports.submission}"],
                 "submissions_listen": [f"127.0.0.1:{ports.submissions}"],
                 "relay_networks": [], "tls_cert_file": pki[0], "tls_key_file": pki[1],
                 # example.org is not in any DNS here: the port-25 sender checks are test_accounts_e2e.py's.
                 "reject_unknown_sender_domain": False, "spf": "off"},
        "auth": {"users_file": users_file},
        "queue": {"shards": [f"tcp://127.0.0.1:{free_port()}"], "spool_dir": str(tmp_path / "spool")},
        "delivery": {"smarthost": sink.address},
        "metrics": {"listen": ""},
        "up": {"frontends": 2, "workers": 1, "pop3": False},
    })
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "cluster", "up", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: log_path.read_text().count("mtacluster: ready") >= 4, 30,
                 "4 ready lines (1 shard, 1 worker, 2 frontends)")
        yield ports, sink
    except AssertionError:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        up.terminate()
        up.wait(30)
        sink.stop()


def swaks(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """swaks as a mail client; `data` (without Message-ID and Date) is sent as the message, else swaks's own."""
    stdin = ("--data", "-") if data is not None else ()
    result = subprocess.run([require_tool("swaks"), "--from", USER, "--to", "friend@elsewhere.test",
                             "--helo", "laptop.test", *stdin, *args],
                            input=data, capture_output=True, timeout=30, check=False)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))


def test_swaks_submits_on_587_with_starttls_and_on_465_with_implicit_tls(
        up_cluster: tuple[Ports, SmtpSink]) -> None:
    ports, sink = up_cluster
    auth = ("--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD)
    anonymous = swaks("--server", f"127.0.0.1:{ports.submission}", "--tls")
    assert anonymous.returncode != 0
    assert "530 5.7.0 Authentication required" in anonymous.stdout
    starttls = swaks("--server", f"127.0.0.1:{ports.submission}", "--tls", *auth)
    implicit = swaks("--server", f"127.0.0.1:{ports.submissions}", "--tlsc", *auth, data=BARE)
    for result in (starttls, implicit):
        assert result.returncode == 0, result.stdout + result.stderr
        assert "235 2.7.0" in result.stdout
    relay = swaks("--server", f"127.0.0.1:{ports.smtp}")
    assert "554 5.7.1 Relay access denied" in relay.stdout  # port 25 is still no open relay
    messages = sink.wait_for_messages(2)
    for message in messages:
        assert message.recipients == ["friend@elsewhere.test"]
        assert "with ESMTPSA id" in message.text
        # swaks writes its own Date and Message-Id, BARE has neither: either way, each is there exactly once.
        assert message.text.lower().count("\nmessage-id:") == 1 and message.text.lower().count("\ndate:") == 1
    assert any("Subject: no id, no date" in m.text and "Message-ID: <" in m.text for m in messages)
