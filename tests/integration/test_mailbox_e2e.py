"""The mailbox role through the whole cluster, with faults: SMTP in, LMTP to the node owning the mailbox, POP3
(STLS) and POP3S (implicit TLS, RFC 8314) out; a mailbox node killed with kill -9 mid-stream loses nothing that
got 250; with two nodes, a POP3 login on the node that does not own the mailbox is proxied to the one that does.
"""

from __future__ import annotations

import os
import poplib
import re
import smtplib
import ssl
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trustme

from cluster.mailbox.ownership import node_for_localpart
from cluster.users import add_user
from tests.support.harness import Cluster, wait_for
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

PASSWORD = "mailbox e2e password"
MESSAGES = 200
SENDERS = 4
SUBJECT = re.compile(rb"^Subject: (m-[0-9a-f]{32})\r?$", re.MULTILINE)


def certificate(directory: Path) -> tuple[Path, ssl.SSLContext]:
    ca = trustme.CA()
    pem = directory / "mailbox.pem"
    ca.issue_cert("127.0.0.1", "127.0.0.2", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return pem, client


def maildir_files(box: Path) -> list[Path]:
    return [p for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir()]


def markers_in(files: list[Path]) -> Counter[str]:
    found: Counter[str] = Counter()
    for path in files:
        with open(path, "rb") as f:
            m = SUBJECT.search(f.read())
        assert m is not None, f"{path} holds no test message"
        found[m.group(1).decode()] += 1
    return found


def send(port: int, markers: list[str], accepted: list[str], failures: list[str]) -> None:
    """One SMTP session sending `markers` to alice; a marker joins `accepted` only after its 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for marker in markers:
            try:
                client.sendmail("bob@example.net", ["alice@local.test"],
                                f"Subject: {marker}\r\n\r\nbody of {marker}\r\n".encode())
            except smtplib.SMTPException as exc:
                failures.append(f"{marker}: {exc}")
                continue
            accepted.append(marker)


def retrieve(client: poplib.POP3) -> tuple[list[str], poplib.POP3]:
    client.user("alice@local.test")
    client.pass_(PASSWORD)
    count = client.stat()[0]
    texts = [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
    found = []
    for text in texts:
        m = SUBJECT.search(text)
        assert m is not None
        found.append(m.group(1).decode())
    return found, client


def mailbox_settings(directory: Path, pem: Path, nodes: list[str], pop3: int, pop3s: int) -> dict[str, Any]:
    return {"maildir_root": str(directory / "maildir"), "nodes": nodes, "lmtp_listen": [nodes[0]],
            "pop3_listen": [f"127.0.0.1:{pop3}"], "pop3s_listen": [f"127.0.0.1:{pop3s}"],
            "tls_cert_file": str(pem), "tls_key_file": str(pem)}


def test_kill_9_of_the_mailbox_loses_no_acknowledged_message(tmp_path: Path) -> None:
    users_file = tmp_path / "users"
    add_user(str(users_file), "alice@local.test", PASSWORD)
    pem, tls_client = certificate(tmp_path)
    lmtp, pop3, pop3s = free_port(), free_port(), free_port()
    cluster = Cluster(tmp_path / "cluster", overrides={
        # One worker with 4 concurrent deliveries: at most 4 LMTP transactions can be in flight at the kill.
        "delivery": {"transports": {"local.test": "local"}, "concurrency": 4, "connect_timeout": 2},
        "queue": {"retry_first": "1s", "retry_max": "2s"},
        "auth": {"users_file": str(users_file)},
        "mailbox": mailbox_settings(tmp_path, pem, [f"127.0.0.1:{lmtp}"], pop3, pop3s),
    })
    mailbox = cluster.role("mailbox")
    box = tmp_path / "maildir" / "alice"
    try:
        cluster.start()
        mailbox.start().wait_ready()
        markers = [f"m-{uuid.uuid4().hex}" for _ in range(MESSAGES)]
        accepted: list[str] = []
        failures: list[str] = []
        senders = [threading.Thread(target=send, args=(cluster.smtp_port, markers[i::SENDERS], accepted, failures))
                   for i in range(SENDERS)]
        for sender in senders:
            sender.start()
        wait_for(lambda: len(maildir_files(box)) >= MESSAGES // 4, 60, "a quarter of the mail in the Maildir")
        mailbox.kill9()
        killed_at = time.time()
        stored_before_kill = len(maildir_files(box))
        mailbox.start().wait_ready()
        for sender in senders:
            sender.join(120)
        assert not failures, failures
        assert sorted(accepted) == sorted(markers)
        assert stored_before_kill < MESSAGES, "the kill came after the last delivery: it tested nothing"

        wait_for(lambda: set(markers_in(maildir_files(box))) >= set(accepted), 90,
                 f"every accepted message in the Maildir; logs:\n{cluster.logs()}")
        copies = markers_in(maildir_files(box))
        duplicated = {marker: n for marker, n in copies.items() if n > 1}
        # Duplicates only for what was in flight at the kill: at most the worker's 4 concurrent deliveries,
        # two copies each, one written before the kill (its 250 never reached the worker) and one after.
        assert len(duplicated) <= 4 and all(n == 2 for n in duplicated.values()), duplicated
        for marker in duplicated:
            times = sorted(os.stat(p).st_mtime for p in maildir_files(box) if marker.encode() in p.read_bytes())
            assert times[0] <= killed_at <= times[1], (marker, times, killed_at)
        total = sum(copies.values())

        # POP3 with STLS: every message; delete the first half.
        stls = poplib.POP3("127.0.0.1", pop3, timeout=30)
        stls.stls(tls_client)
        assert isinstance(stls.sock, ssl.SSLSocket)
        found, stls = retrieve(stls)
        assert len(found) == total and set(found) == set(accepted)
        half = total // 2
        for number in range(1, half + 1):
            stls.dele(number)
        stls.quit()
        # POP3S, TLS from the first byte: the rest.
        implicit = poplib.POP3_SSL("127.0.0.1", pop3s, context=tls_client, timeout=30)
        rest, implicit = retrieve(implicit)
        assert sorted(rest) == sorted(found[half:])
        for number in range(1, len(rest) + 1):
            implicit.dele(number)
        implicit.quit()
        assert maildir_files(box) == []
        log = mailbox.log()
        assert PASSWORD not in log and "Traceback" not in log
        print(f"accepted={len(accepted)} stored_before_kill={stored_before_kill} duplicates={len(duplicated)}")
    finally:
        cluster.stop()


def test_two_nodes_each_own_their_users_and_pop3_logins_are_proxied(tmp_path: Path) -> None:
    users_file = tmp_path / "users"
    names = [f"user{i}" for i in range(12)]
    for name in names:
        add_user(str(users_file), f"{name}@local.test", PASSWORD)
    pem, tls_client = certificate(tmp_path)
    lmtp, pop3, pop3s = free_port(), free_port(), free_port()
    nodes = [f"127.0.0.1:{lmtp}", f"127.0.0.2:{lmtp}"]
    cluster = Cluster(tmp_path / "cluster", overrides={
        "delivery": {"transports": {"local.test": "local"}},
        "auth": {"users_file": str(users_file)},
        "mailbox": mailbox_settings(tmp_path, pem, nodes, pop3, pop3s),
    })
    first = cluster.role("mailbox", "--node", "0")
    second = cluster.role("mailbox", "--node", "1")
    # Node 1 listens on 127.0.0.2 with the same ports, and keeps its Maildirs apart (its own volume).
    second.env.update({"MTACLUSTER_MAILBOX_LMTP_LISTEN": f'["127.0.0.2:{lmtp}"]',
                       "MTACLUSTER_MAILBOX_POP3_LISTEN": f'["127.0.0.2:{pop3}"]',
                       "MTACLUSTER_MAILBOX_POP3S_LISTEN": f'["127.0.0.2:{pop3s}"]',
                       "MTACLUSTER_MAILBOX_MAILDIR_ROOT": f'"{tmp_path / "maildir-1"}"'})
    owners = {name: node_for_localpart(name, nodes) for name in names}
    assert set(owners.values()) == {0, 1}, "the test needs users on both nodes"
    roots = [tmp_path / "maildir", tmp_path / "maildir-1"]
    try:
        cluster.start()
        first.start()
        second.start()
        first.wait_ready()
        second.wait_ready()
        with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30) as client:
            for name in names:
                client.sendmail("bob@example.net", [f"{name}@local.test"], f"Subject: for {name}\r\n\r\nx\r\n".encode())
        for name, owner in owners.items():
            wait_for(lambda n=name, o=owner: len(maildir_files(roots[o] / n)) == 1, 30,
                     f"{name}'s message on node {owner}; logs:\n{cluster.logs()}")
            assert not (roots[1 - owner] / name).exists(), f"{name}'s Maildir also on node {1 - owner}"
        # Every user logs in on both nodes, over STLS and over POP3S: the wrong node proxies to the owner.
        for name, owner in owners.items():
            for host in ("127.0.0.1", "127.0.0.2"):
                client = poplib.POP3(host, pop3, timeout=30)
                client.stls(tls_client)
                client.user(f"{name}@local.test")
                client.pass_(PASSWORD)
                (_, lines, _) = client.retr(1)
                assert f"Subject: for {name}".encode() in lines, (name, host)
                client.quit()
            implicit = poplib.POP3_SSL("127.0.0.2" if owner == 0 else "127.0.0.1", pop3s, context=tls_client,
                                       timeout=30)
            implicit.user(f"{name}@local.test")
            implicit.pass_(PASSWORD)
            assert implicit.stat()[0] == 1
            implicit.dele(1)
            implicit.quit()
            assert maildir_files(roots[owner] / name) == [], f"{name}: DELE through the proxy removed nothing"
        proxied = [line for line in first.log().splitlines() + second.log().splitlines() if "proxied to node" in line]
        assert len(proxied) == 2 * len(names), proxied  # one STLS and one POP3S login per user on the wrong node
        wrong = poplib.POP3("127.0.0.2", pop3, timeout=30)
        wrong.user(f"{names[0]}@local.test")
        with pytest.raises(poplib.error_proto, match="AUTH"):
            wrong.pass_("not the password")
        wrong.quit()
    finally:
        cluster.stop()
