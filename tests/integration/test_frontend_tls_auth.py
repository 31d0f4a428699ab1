"""STARTTLS (RFC 3207) and SMTP AUTH (RFC 4954) on a real frontend, with certificates made by trustme.

Most tests run the frontend in-process against scripted shards (as test_frontend_inject.py does); the swaks test
runs a whole cluster of real processes and checks that the password never reaches any role's log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client import REGISTRY

from cluster.config import ConfigError, config_from_dict
from cluster.frontend.server import Frontend
from cluster.tls import server_context
from cluster.users import add_user
from tests.support.harness import Cluster, SmtpSink
from tests.support.scripted_shard import ScriptedShard, stored
from tests.support.tooling import free_port, require_tool

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice@example.org", "correct horse battery staple"
OUTSIDER = ("127.0.0.5", 0)  # outside relay_networks below
MESSAGE = b"Subject: tls\r\n\r\nbody\r\n"


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


def counter(name: str, result: str) -> float:
    return REGISTRY.get_sample_value(name, {"result": result}) or 0.0


@contextlib.asynccontextmanager
async def frontend(pki: tuple[str, str], users_file: str, **smtp: object) -> AsyncIterator[
        tuple[int, ScriptedShard]]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    shard = ScriptedShard(endpoint, stored)
    serving = asyncio.create_task(shard.serve())
    port = free_port()
    config = config_from_dict({
        "smtp": {"hostname": "mta.test", "listen": [f"127.0.0.1:{port}"], "relay_networks": ["127.0.0.1/32"],
                 "tls_cert_file": pki[0], "tls_key_file": pki[1], "reject_unknown_sender_domain": False,
                 "spf": "off", **smtp},
        # The scripted shard answers only injects: no cluster-wide AUTH failure count, no daily limits here
        # (test_accounts_e2e.py tests those against real shards).
        "queue": {"shards": [endpoint]}, "auth": {"users_file": users_file, "max_failures_per_client": 0},
        "limits": {"messages_per_day": 0, "recipients_per_day": 0}}, environ={})
    server = Frontend(config)
    stop = asyncio.Event()
    running = asyncio.create_task(server.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not server.is_ready():
            assert asyncio.get_running_loop().time() < deadline, "frontend never became ready"
            await asyncio.sleep(0.02)
        yield port, shard
    finally:
        stop.set()
        await running
        serving.cancel()
        shard.socket.close(linger=0)


def relay_with_auth(port: int, context: ssl.SSLContext, mechanism: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=OUTSIDER) as client:
        client.ehlo("client.test")
        seen["before_tls"] = dict(client.esmtp_features)
        client.mail("sender@client.test")
        seen["rcpt_before_auth"] = client.rcpt("someone@elsewhere.test")
        client.rset()
        client.starttls(context=context)
        client.ehlo("client.test")
        seen["after_tls"] = dict(client.esmtp_features)
        client.user, client.password = USER, PASSWORD
        if mechanism == "LOGIN":
            seen["auth"] = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        else:
            seen["auth"] = client.login(USER, PASSWORD)
        client.mail(USER)  # auth.sender_login_match: the user's own address
        seen["rcpt_after_auth"] = client.rcpt("someone@elsewhere.test")
        seen["data"] = client.data(MESSAGE)
    return seen


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_outsider_relays_only_after_starttls_and_auth(
        mechanism: str, ca: trustme.CA, pki: tuple[str, str], users_file: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    successes = counter("mtacluster_smtp_auth_total", "success")
    handshakes = counter("mtacluster_smtp_tls_handshakes_total", "success")
    async with frontend(pki, users_file) as (port, shard):
        seen = await asyncio.to_thread(relay_with_auth, port, client_context(ca), mechanism)
    assert "starttls" in seen["before_tls"] and "auth" not in seen["before_tls"]
    assert seen["after_tls"]["auth"] == " PLAIN LOGIN" and "starttls" not in seen["after_tls"]
    assert seen["rcpt_before_auth"] == (554, b"5.7.1 Relay access denied: this server does not relay for you")
    assert seen["auth"] == (235, b"2.7.0 Authentication successful")
    assert seen["rcpt_after_auth"][0] == 250
    assert seen["data"][0] == 250
    [inject] = shard.injects
    assert inject.recipients == ["someone@elsewhere.test"]
    assert inject.body.startswith(b"Received: from client.test ([127.0.0.5])\r\n\tby mta.test (mtacluster) with "
                                  b"ESMTPSA id ")
    assert USER.encode() not in inject.body
    assert counter("mtacluster_smtp_auth_total", "success") == successes + 1
    assert counter("mtacluster_smtp_tls_handshakes_total", "success") == handshakes + 1
    assert PASSWORD not in caplog.text
    assert base64.b64encode(PASSWORD.encode()).decode() not in caplog.text


def auth_without_tls(port: int) -> tuple[tuple[int, bytes], dict[str, str]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        features = dict(client.esmtp_features)
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {plain}"), features


async def test_auth_before_starttls_gets_538(pki: tuple[str, str], users_file: str) -> None:
    async with frontend(pki, users_file) as (port, _):
        answer, features = await asyncio.to_thread(auth_without_tls, port)
    assert answer == (538, b"5.7.11 Encryption required for requested authentication mechanism")
    assert "auth" not in features


def auth_refusals_over_tls(port: int, context: ssl.SSLContext) -> list[tuple[int, bytes]]:
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.starttls(context=context)
        answers = [client.docmd("AUTH", f"PLAIN {plain}")]  # no EHLO since TLS: the session started over
        client.ehlo("client.test")
        client.mail("sender@client.test")
        answers.append(client.docmd("AUTH", f"PLAIN {plain}"))  # during a transaction
        client.rset()
        answers.append(client.docmd("AUTH", "LOGIN"))
        answers.append(client.docmd("*"))  # cancelled
        answers.append(client.docmd("AUTH", "PLAIN not-base64!"))
        answers.append(client.docmd("AUTH", "CRAM-MD5"))
        answers.append(client.docmd("AUTH", f"PLAIN {plain}"))
        answers.append(client.docmd("AUTH", f"PLAIN {plain}"))  # twice
        answers.append(client.docmd("STARTTLS"))  # twice
    return answers


async def test_auth_refusals_inside_a_tls_session(ca: trustme.CA, pki: tuple[str, str], users_file: str) -> None:
    async with frontend(pki, users_file) as (port, _):
        answers = await asyncio.to_thread(auth_refusals_over_tls, port, client_context(ca))
    assert answers == [
        (503, b"5.5.1 Send EHLO first"),
        (503, b"5.5.1 AUTH not permitted during a mail transaction"),
        (334, b"VXNlcm5hbWU6"),
        (501, b"5.7.0 Authentication cancelled"),
        (501, b"5.5.2 Cannot decode response"),
        (504, b"5.5.4 Unrecognized authentication type (use PLAIN or LOGIN)"),
        (235, b"2.7.0 Authentication successful"),
        (503, b"5.5.1 Already authenticated"),
        (503, b"5.5.1 TLS already active"),
    ]


async def test_unreadable_users_file_is_a_temporary_failure(ca: trustme.CA, pki: tuple[str, str],
                                                            tmp_path: Path) -> None:
    async with frontend(pki, str(tmp_path / "missing")) as (port, _):
        answers = await asyncio.to_thread(guess_passwords, port, client_context(ca), 1, False)
    assert answers[0] == (454, b"4.7.0 Temporary authentication failure")


def guess_passwords(port: int, context: ssl.SSLContext, guesses: int,
                    expect_close: bool = True) -> list[tuple[int, bytes]]:
    answers = []
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    try:
        client.ehlo("client.test")
        client.starttls(context=context)
        client.ehlo("client.test")
        for i in range(guesses):
            plain = base64.b64encode(f"\0{USER}\0wrong{i}".encode()).decode()
            answers.append(client.docmd("AUTH", f"PLAIN {plain}"))
        if expect_close:  # after the limit the server has said 421 and closed the connection
            answers.append(client.getreply())
    except smtplib.SMTPServerDisconnected:
        answers.append((0, b"disconnected"))
    finally:
        client.close()
    return answers


async def test_wrong_passwords_get_535_and_the_limit_closes_with_421(
        ca: trustme.CA, pki: tuple[str, str], users_file: str) -> None:
    failures = counter("mtacluster_smtp_auth_total", "failure")
    async with frontend(pki, users_file, max_auth_failures=2) as (port, _):
        answers = await asyncio.to_thread(guess_passwords, port, client_context(ca), 2)
    assert answers[0] == (535, b"5.7.8 Authentication credentials invalid")
    assert answers[1] == (535, b"5.7.8 Authentication credentials invalid")
    assert answers[2][0] == 421 and answers[2][1].startswith(b"4.7.0 Too many failed authentication attempts")
    assert counter("mtacluster_smtp_auth_total", "failure") == failures + 2


async def test_plaintext_pipelined_behind_starttls_is_discarded(ca: trustme.CA, pki: tuple[str, str],
                                                                users_file: str) -> None:
    async with frontend(pki, users_file) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220 ")
        writer.write(b"EHLO client.test\r\n")
        while not (line := await reader.readline()).startswith(b"250 "):
            assert line.startswith(b"250-")
        # CVE-2011-0411: the NOOP must not be answered inside the TLS session.
        writer.write(b"STARTTLS\r\nNOOP\r\n")
        assert await reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        await writer.start_tls(client_context(ca), server_hostname="127.0.0.1")
        writer.write(b"EHLO client.test\r\n")
        first = await asyncio.wait_for(reader.readline(), 10)
        assert first.startswith(b"250-mta.test"), first
        writer.close()


async def test_failed_handshake_ends_the_session_quietly(pki: tuple[str, str], users_file: str) -> None:
    failures = counter("mtacluster_smtp_tls_handshakes_total", "failure")
    async with frontend(pki, users_file) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO client.test\r\nSTARTTLS\r\n")
        while not (await reader.readline()).startswith(b"220 2.0.0"):
            pass
        writer.write(b"this is not a TLS client hello\r\n" * 4)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert counter("mtacluster_smtp_tls_handshakes_total", "failure") == failures + 1


def test_tls_context_accepts_tls_1_2_and_newer_only(pki: tuple[str, str]) -> None:
    context = server_context(pki[0], pki[1], "smtp")
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_context("", "", "smtp") is None


def test_tls_files_must_come_in_pairs_and_be_readable(pki: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing_key:
        config_from_dict({"smtp": {"tls_cert_file": pki[0]}}, environ={})
    assert missing_key.value.key == "smtp.tls_key_file"
    config = config_from_dict({"smtp": {"tls_cert_file": str(tmp_path / "nope.crt"), "tls_key_file": pki[1]}},
                              environ={})
    with pytest.raises(ConfigError) as unreadable:
        Frontend(config)
    assert unreadable.value.key == "smtp.tls_cert_file"
    swapped = config_from_dict({"smtp": {"tls_cert_file": pki[1], "tls_key_file": pki[0]}}, environ={})
    with pytest.raises(ConfigError):
        Frontend(swapped)


@pytest.fixture
def tls_cluster(tmp_path: Path, pki: tuple[str, str], users_file: str,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cluster, SmtpSink]]:
    monkeypatch.setenv("MTACLUSTER_LOG_LEVEL", "DEBUG")
    sink = SmtpSink(tmp_path / "sink").start()
    cluster = Cluster(tmp_path / "cluster", overrides={
        "smtp": {"relay_networks": ["127.0.0.1/32"], "tls_cert_file": pki[0], "tls_key_file": pki[1]},
        "auth": {"users_file": users_file}, "delivery": {"smarthost": sink.address}})
    try:
        yield cluster.start(), sink
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        sink.stop()


def test_swaks_starttls_auth_plain_relays_and_no_log_holds_the_password(
        tls_cluster: tuple[Cluster, SmtpSink]) -> None:
    swaks = require_tool("swaks")
    cluster, sink = tls_cluster
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{cluster.smtp_port}", "--local-interface", "127.0.0.5",
         "--from", USER, "--to", "friend@elsewhere.test", "--tls", "--auth", "PLAIN",
         "--auth-user", USER, "--auth-password", PASSWORD, "--helo", "client.test"],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    [message] = sink.wait_for_messages(1)
    assert message.recipients == ["friend@elsewhere.test"]
    assert "with ESMTPSA id" in message.text
    logs = [p.log() for p in cluster.processes]
    assert any(f"authenticated user={USER}" in log for log in logs)
    encoded = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    for log in logs:
        assert PASSWORD not in log and encoded not in log
