"""The local transport end to end in one process: a worker's Deliverer speaks LMTP over real sockets to a
mailbox node (`MailboxServer`), which stores each recipient on its own (fsync, quota, errors) and answers it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client import REGISTRY

from cluster.bus.schemas import Deliver
from cluster.config import Config, config_from_dict
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.deliver import Deliverer
from cluster.delivery.lmtp import LocalDelivery
from cluster.delivery.mx import StaticMxResolver, Target
from cluster.delivery.session import HostUnavailable, SmtpSession
from cluster.mailbox.ownership import node_for_localpart
from cluster.mailbox.quota import mailbox_usage
from cluster.mailbox.service import MailboxServer
from cluster.users import hash_password
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

BODY = b"Received: from x\r\nSubject: local\r\n\r\n.dot stays single here\r\n\xc3\xa9\r\n"


def make_config(tmp_path: Path, nodes: int = 1, users_file: str = "", **mailbox: Any) -> Config:
    ports = [free_port() for _ in range(nodes)]
    return config_from_dict({
        "auth": {"users_file": users_file},
        "delivery": {"transports": {"local.test": "local"}, "connect_timeout": 2},
        "mailbox": {"maildir_root": str(tmp_path / "maildir"), "nodes": [f"127.0.0.1:{p}" for p in ports],
                    "lmtp_listen": [f"127.0.0.1:{ports[0]}"], "pop3_listen": [f"127.0.0.1:{free_port()}"],
                    **mailbox},
        "metrics": {"listen": ""},
    }, environ={})


@contextlib.asynccontextmanager
async def mailbox_node(config: Config, node: int = 0) -> AsyncIterator[MailboxServer]:
    server = MailboxServer(config, node)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    async with asyncio.timeout(5):
        while not server.is_ready():
            await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def job(*recipients: str, body: bytes = BODY) -> Deliver:
    return Deliver(job_id="j", queue_id="q", sender="s@o.test", recipients=list(recipients), domain="local.test",
                   body=body, attempt=1)


@contextlib.asynccontextmanager
async def deliverer(config: Config) -> AsyncIterator[Deliverer]:
    worker = Deliverer(config, StaticMxResolver({}), ConnectionCache(30, 100))
    try:
        yield worker
    finally:
        worker.cache.close_all()


def files(root: Path, mailbox: str) -> list[Path]:
    return sorted((root / mailbox / "new").iterdir()) if (root / mailbox / "new").is_dir() else []


async def test_each_recipient_is_stored_fsynced_and_reported(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with mailbox_node(config), deliverer(config) as worker:
        ok, other, bad = await worker.deliver(job("u1@local.test", "U2@local.test", ".hidden@local.test"))
        assert len(worker.cache) == 1  # the connection went back to the cache, and is reused
        again = await worker.deliver(job("u1@local.test"))
        assert worker.connections_opened == 0 and len(worker.cache) == 1
    assert (ok.kind, ok.code, other.kind, bad.kind, bad.enhanced) == ("delivered", 250, "delivered",
                                                                            "failed", "5.1.3")
    assert ok.text.startswith("Delivered to the mailbox as ") and ok.remote == "127.0.0.1[127.0.0.1]"
    assert again[0].kind == "delivered"
    # Each file by the name its reply gave, not by the order of names (not zero-padded, a Maildir name does
    # not sort as text in the order of delivery: M99999 comes after M200000 within one second).
    stored = {path.name: path for path in files(tmp_path / "maildir", "u1")}
    named = [outcome.text.removeprefix("Delivered to the mailbox as ") for outcome in (ok, again[0])]
    assert sorted(stored) == sorted(named)
    assert stored[named[0]].read_bytes() == b"Return-Path: <s@o.test>\r\n" + BODY
    assert len(files(tmp_path / "maildir", "u2")) == 1
    assert list((tmp_path / "maildir" / "u1" / "tmp").iterdir()) == []


async def test_quota_decides_per_recipient(tmp_path: Path) -> None:
    """452 4.2.2 over quota now (deferred), 552 5.2.2 larger than the quota (failed); the others delivered."""
    config = make_config(tmp_path, quota=3 * len(BODY))
    async with mailbox_node(config), deliverer(config) as worker:
        for _ in range(2):
            assert [o.kind for o in await worker.deliver(job("full@local.test"))] == ["delivered"]
        outcomes = await worker.deliver(job("full@local.test", "empty@local.test"))
        assert [(o.kind, o.code, o.enhanced) for o in outcomes] == [("deferred", 452, "4.2.2"),
                                                                     ("delivered", 250, "2.0.0")]
        big = await worker.deliver(job("empty@local.test", body=BODY * 4))
        assert [(o.kind, o.code, o.enhanced) for o in big] == [("failed", 552, "5.2.2")]
    usage = mailbox_usage(config, "full@local.test")
    assert (usage.messages, usage.quota) == (2, 3 * len(BODY)) and usage.octets > 2 * len(BODY)


async def test_a_write_error_defers_only_that_recipient(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    (tmp_path / "maildir").mkdir()
    (tmp_path / "maildir" / "blocked").write_text("a file where the Maildir should be")
    async with mailbox_node(config), deliverer(config) as worker:
        blocked, fine = await worker.deliver(job("blocked@local.test", "fine@local.test"))
    assert (blocked.kind, blocked.code, blocked.enhanced) == ("deferred", 451, "4.3.0")
    assert fine.kind == "delivered"


async def test_an_unreachable_node_defers(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with deliverer(config) as worker:
        (outcome,) = await worker.deliver(job("u@local.test"))
    assert (outcome.kind, outcome.code, outcome.enhanced) == ("deferred", 451, "4.4.1")


async def test_recipients_go_to_their_owner_and_a_node_refuses_the_others(tmp_path: Path) -> None:
    config = make_config(tmp_path, nodes=2)
    names = [f"user{i}" for i in range(40)]
    mine = [n for n in names if node_for_localpart(n, config.mailbox.nodes) == 0]
    theirs = [n for n in names if node_for_localpart(n, config.mailbox.nodes) == 1]
    assert mine and theirs
    async with mailbox_node(config, 0) as server:
        async with deliverer(config) as worker:
            outcomes = await worker.deliver(job(*(f"{n}@local.test" for n in (mine[0], theirs[0]))))
        # Node 1 is not running: its recipient is deferred, node 0's is delivered.
        assert [o.kind for o in outcomes] == ["delivered", "deferred"]
        # A worker with another idea of the nodes (one node only) reaches node 0 with node 1's mailbox.
        stale = config_from_dict({"delivery": {"transports": {"local.test": "local"}},
                                  "mailbox": {"nodes": [config.mailbox.nodes[0]]}, "metrics": {"listen": ""}},
                                 environ={})
        async with deliverer(stale) as worker:
            (refused,) = await worker.deliver(job(f"{theirs[0]}@local.test"))
        assert (refused.kind, refused.code, refused.enhanced) == ("deferred", 451, "4.3.5")
        assert server.node == 0
    assert not os.path.exists(tmp_path / "maildir" / theirs[0])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_lmtp_to_a_node_off_loopback_requires_starttls(tmp_path: Path) -> None:
    """ARCHITECTURE.md contract 5: workers speak LMTP to nodes off loopback only under TLS (checked with
    mailbox.node_ca_file when set). Loopback here stands in for the network: the settings a worker uses for an
    off-host node are applied to a local one."""
    ca = trustme.CA()
    pem, ca_file = tmp_path / "node.pem", tmp_path / "ca.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca.cert_pem.write_to_path(str(ca_file))
    with_tls = make_config(tmp_path, tls_cert_file=str(pem), tls_key_file=str(pem), node_ca_file=str(ca_file))
    local = LocalDelivery(with_tls, ConnectionCache(30, 100))
    off_host = Target("mailbox-1.example", "10.0.0.7", 2424)
    assert local.settings_for(off_host).tls_mode == "verify"
    assert local.settings_for(Target("127.0.0.1", "127.0.0.1", 2424)).tls_mode == "none"
    node = local.targets[0]
    async with mailbox_node(with_tls):
        session = await SmtpSession.open(node, local.settings_for(off_host))
        assert session.tls and session.capabilities.offers("PIPELINING")
        result = await session.transaction("s@o.test", ["tls@local.test"], BODY)
        assert result.replies["tls@local.test"].code == 250
        session.close()
    without_tls = make_config(tmp_path / "plain")
    plain = LocalDelivery(without_tls, ConnectionCache(30, 100))
    async with mailbox_node(without_tls):
        with pytest.raises(HostUnavailable, match="does not offer STARTTLS"):
            await SmtpSession.open(plain.targets[0], local.settings_for(off_host))
    # A certificate from another CA is refused when node_ca_file is set.
    stranger = tmp_path / "stranger.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(stranger))
    impostor = make_config(tmp_path / "impostor", tls_cert_file=str(stranger), tls_key_file=str(stranger))
    async with mailbox_node(impostor):
        with pytest.raises(HostUnavailable, match="TLS handshake"):
            await SmtpSession.open(LocalDelivery(impostor, ConnectionCache(30, 100)).targets[0],
                                   local.settings_for(off_host))


async def test_metrics_count_lmtp_outcomes_on_both_sides(tmp_path: Path) -> None:
    config = make_config(tmp_path, quota=2 * len(BODY))
    before = {o: metric("mtacluster_lmtp_deliveries_total", outcome=o) for o in ("delivered", "too_big", "refused")}
    worker_before = {o: metric("mtacluster_delivery_lmtp_total", outcome=o)
                     for o in ("delivered", "failed", "node_unavailable")}
    async with mailbox_node(config), deliverer(config) as worker:
        await worker.deliver(job("m1@local.test", ".bad@local.test"))
        await worker.deliver(job("m1@local.test", body=BODY * 3))
    async with deliverer(config) as worker:
        await worker.deliver(job("m1@local.test"))  # the node is gone
    assert metric("mtacluster_lmtp_deliveries_total", outcome="delivered") == before["delivered"] + 1
    assert metric("mtacluster_lmtp_deliveries_total", outcome="too_big") == before["too_big"] + 1
    assert metric("mtacluster_delivery_lmtp_total", outcome="delivered") == worker_before["delivered"] + 1
    # ".bad" never reaches a node (the worker refuses it), the too-big message is refused by the node.
    assert metric("mtacluster_delivery_lmtp_total", outcome="failed") == worker_before["failed"] + 2
    assert metric("mtacluster_delivery_lmtp_total", outcome="node_unavailable") == \
        worker_before["node_unavailable"] + 1
    assert metric("mtacluster_mailbox_size_bytes_count") >= 1


async def test_a_stopping_node_finishes_nothing_half_and_says_421(tmp_path: Path) -> None:
    """Graceful stop (SIGTERM of a pod): an idle LMTP connection is told 421 and closed; the node stops."""
    config = make_config(tmp_path)
    server = MailboxServer(config, 0)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    async with asyncio.timeout(5):
        while not server.is_ready():
            await asyncio.sleep(0.01)
    host, port = server.lmtp_addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    assert (await reader.readline()).startswith(b"220 ")
    writer.write(b"LHLO worker.test\r\nMAIL FROM:<s@o.test>\r\n")
    while not (await reader.readline()).startswith(b"250 2.1.0"):
        pass
    stop.set()
    assert await asyncio.wait_for(reader.read(), 10) == b"421 4.3.2 Mailbox node shutting down\r\n"
    writer.close()
    await asyncio.wait_for(task, 10)
    assert not list((tmp_path / "maildir").rglob("new/*"))


async def test_a_users_own_quota_overrides_the_default(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f'[users."small@local.test"]\npassword = "{hash_password("x")}"\n'
                     f'mailbox_quota = {2 * len(BODY)}\n')
    config = make_config(tmp_path, users_file=str(users), quota="1MiB")
    async with mailbox_node(config), deliverer(config) as worker:
        first = await worker.deliver(job("small@local.test", "big@local.test"))
        second = await worker.deliver(job("small@local.test", "big@local.test"))
    assert [o.kind for o in first] == ["delivered", "delivered"]
    assert [(o.kind, o.code, o.enhanced) for o in second] == [("deferred", 452, "4.2.2"), ("delivered", 250, "2.0.0")]
