"""The mailbox role's POP3 as a real process, driven by Python's poplib: listing, retrieval, deletion, locks, STLS."""

from __future__ import annotations

import poplib
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from cluster.mailbox.maildir import MaildirStore
from cluster.mailbox.pop3_protocol import normalize_message
from cluster.users import add_user
from tests.support.harness import Cluster, RoleProcess, wait_for
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"
USERS = ("alice@local.test", "bob", "carol", "dave", "erin", "frank", "grace")


@dataclass
class Pop3Role:
    process: RoleProcess
    port: int
    metrics_port: int
    maildir: Path
    ca: trustme.CA

    def deliver(self, user: str, body: bytes) -> Path:
        return MaildirStore(self.maildir, "mta.test").deliver(user, "sender@example.net", body)

    def login(self, user: str, password: str = PASSWORD) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.port, timeout=10)
        client.user(user)
        client.pass_(password)
        return client

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
            text: str = answer.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def pop3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pop3Role]:
    directory = tmp_path_factory.mktemp("pop3")
    users_file = directory / "users"
    for user in USERS:
        add_user(str(users_file), user, PASSWORD)
    ca = trustme.CA()
    pem = directory / "pop3.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    port, metrics_port, lmtp_port = free_port(), free_port(), free_port()
    cluster = Cluster(directory, overrides={
        "auth": {"users_file": str(users_file)},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "mailbox": {"maildir_root": str(directory / "maildir"), "pop3_listen": [f"127.0.0.1:{port}"],
                    "lmtp_listen": [f"127.0.0.1:{lmtp_port}"], "nodes": [f"127.0.0.1:{lmtp_port}"],
                    "tls_cert_file": str(pem), "tls_key_file": str(pem), "max_auth_failures": 2},
    })
    process = cluster.role("mailbox").start()
    try:
        process.wait_ready()
        yield Pop3Role(process, port, metrics_port, directory / "maildir", ca)
    finally:
        assert process.stop() == 0, process.log()


def test_list_uidl_and_retr_are_byte_exact(pop3: Pop3Role) -> None:
    bodies = [b"Subject: one\r\n\r\nhello\r\n.leading dot\r\n..two dots\r\n",
              b"Subject: bare LF\n\nwritten by someone else\n.\n",
              b"Subject: three\r\n\r\n" + (b"x" * 998 + b"\r\n") * 50]
    paths = [pop3.deliver("alice", body) for body in bodies]
    expected = [normalize_message(path.read_bytes()) for path in paths]
    client = pop3.login("alice@local.test")
    try:
        assert client.stat() == (3, sum(len(e) for e in expected))
        _, listing, _ = client.list()
        assert listing == [f"{i + 1} {len(e)}".encode() for i, e in enumerate(expected)]
        _, uids, _ = client.uidl()
        assert uids == [f"{i + 1} {p.name}".encode() for i, p in enumerate(paths)]
        for number, content in enumerate(expected, 1):
            response, lines, _ = client.retr(number)
            assert response == f"+OK {len(content)} octets".encode()
            assert b"\r\n".join(lines) + b"\r\n" == content
        _, top, _ = client.top(1, 1)
        assert top == [b"Return-Path: <sender@example.net>", b"Subject: one", b"", b"hello"]
    finally:
        client.quit()
    assert sorted(p.name for p in (pop3.maildir / "alice" / "cur").iterdir()) == \
        sorted(f"{p.name}:2," for p in paths)


def test_dele_then_quit_removes_and_a_dropped_connection_keeps(pop3: Pop3Role) -> None:
    kept, removed = pop3.deliver("bob", b"Subject: keep\r\n\r\n1\r\n"), pop3.deliver("bob", b"Subject: rm\r\n\r\n2\r\n")
    client = pop3.login("bob")
    client.dele(1)
    client.dele(2)
    client.close()  # dropped without QUIT: nothing is deleted

    def relogin() -> poplib.POP3 | None:
        try:
            return pop3.login("bob")
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0]  # the server has not yet seen the drop
            return None

    client = wait_for(relogin, 10, "the dropped session's lock to go")
    assert client.stat()[0] == 2
    client.dele(2)
    assert client.quit().startswith(b"+OK")
    assert [p.name for p in (pop3.maildir / "bob" / "cur").iterdir()] == [f"{kept.name}:2,"]
    assert removed.name not in str(list((pop3.maildir / "bob").rglob("*")))
    client = pop3.login("bob")
    assert client.uidl()[1] == [f"1 {kept.name}".encode()]
    client.quit()


def test_a_second_session_gets_in_use(pop3: Pop3Role) -> None:
    pop3.deliver("carol", b"Subject: x\r\n\r\ny\r\n")
    first = pop3.login("carol")
    second = poplib.POP3("127.0.0.1", pop3.port, timeout=10)
    second.user("carol")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    assert first.stat()[0] == 1
    first.quit()
    second.user("carol")
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


def test_wrong_passwords_close_the_session(pop3: Pop3Role) -> None:
    failed_before = pop3.metric('mtacluster_pop3_logins_total{result="failed"}')
    client = poplib.POP3("127.0.0.1", pop3.port, timeout=10)
    client.user("dave")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Invalid"):
        client.pass_("wrong")
    client.user("dave")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Too many failed logins"):
        client.pass_("also wrong")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.noop()
    client.close()
    assert pop3.metric('mtacluster_pop3_logins_total{result="failed"}') == failed_before + 2
    unknown = poplib.POP3("127.0.0.1", pop3.port, timeout=10)
    unknown.user("nobody-here")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Invalid"):
        unknown.pass_(PASSWORD)
    unknown.quit()


def test_stls_then_login(pop3: Pop3Role) -> None:
    pop3.deliver("erin", b"Subject: secret\r\n\r\nover TLS\r\n")
    client = poplib.POP3("127.0.0.1", pop3.port, timeout=10)
    assert "STLS" in client.capa() and "USER" in client.capa()
    context = ssl.create_default_context()
    pop3.ca.configure_trust(context)
    client.stls(context)
    assert isinstance(client.sock, ssl.SSLSocket)
    assert "STLS" not in client.capa()
    client.user("erin")
    client.pass_(PASSWORD)
    assert client.retr(1)[1][-1] == b"over TLS"
    client.quit()


def test_line_limit_and_unknown_commands_over_the_wire(pop3: Pop3Role) -> None:
    with socket.create_connection(("127.0.0.1", pop3.port), timeout=10) as raw:
        stream = raw.makefile("rwb")
        assert stream.readline().startswith(b"+OK")
        stream.write(b"USER " + b"a" * 300 + b"\r\nFOO\r\nQUIT\r\n")
        stream.flush()
        assert stream.readline() == b"-ERR Command line too long\r\n"
        assert stream.readline() == b"-ERR Unknown command\r\n"
        assert stream.readline() == b"+OK Bye\r\n"
        assert stream.readline() == b""


def test_metrics(pop3: Pop3Role) -> None:
    retrieved = pop3.metric("mtacluster_pop3_messages_retrieved_total")
    deleted = pop3.metric("mtacluster_pop3_messages_deleted_total")
    ok = pop3.metric('mtacluster_pop3_logins_total{result="ok"}')
    pop3.deliver("frank", b"Subject: m\r\n\r\nm\r\n")
    client = pop3.login("frank")
    assert pop3.metric("mtacluster_pop3_connections_current") >= 1
    client.retr(1)
    client.dele(1)
    client.quit()
    assert pop3.metric("mtacluster_pop3_messages_retrieved_total") == retrieved + 1
    assert pop3.metric("mtacluster_pop3_messages_deleted_total") == deleted + 1
    assert pop3.metric('mtacluster_pop3_logins_total{result="ok"}') == ok + 1
    assert PASSWORD not in pop3.process.log()


def test_a_bad_certificate_stops_the_role_with_one_line_also_under_the_old_names(tmp_path: Path) -> None:
    """The old [pop3] section and `serve pop3` still work (as the mailbox role), with deprecation notes."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    cluster = Cluster(tmp_path, overrides={
        "pop3": {"listen": [f"127.0.0.1:{free_port()}"], "tls_cert_file": str(bad), "tls_key_file": str(bad)},
    })
    process = cluster.role("pop3").start()
    assert process.process is not None
    assert process.process.wait(20) == 1
    log = process.log()
    assert "the pop3 role is now the mailbox role" in log
    assert "pop3.tls_key_file is deprecated; it is read as mailbox.tls_key_file" in log
    assert "mtacluster serve mailbox: mailbox.tls_key_file: cannot use" in log
    assert "Traceback" not in log
