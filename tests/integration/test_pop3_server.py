"""The mailbox role's POP3 listener in this process over real sockets: idle timeout, connection limit, shutdown,
users file errors.

Timeouts here are shorter than `load_config` allows (RFC 1939 asks for 10 minutes): the Config is built directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from cluster.config import Config, Duration, config_from_dict
from cluster.mailbox.maildir import MaildirStore
from cluster.mailbox.ownership import node_for_localpart
from cluster.mailbox.pop3 import Pop3Server
from cluster.users import add_user
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

PASSWORD = "pw"


def make_config(tmp_path: Path, users_file: str, *, idle_timeout: float = 600, max_connections: int = 500) -> Config:
    base = config_from_dict({"mailbox": {"maildir_root": str(tmp_path / "maildir"),
                                         "pop3_listen": [f"127.0.0.1:{free_port()}"]},
                             "auth": {"users_file": users_file}, "metrics": {"listen": ""}}, environ={})
    mailbox = dataclasses.replace(base.mailbox, idle_timeout=Duration(idle_timeout), max_connections=max_connections)
    return dataclasses.replace(base, mailbox=mailbox)


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users"
    add_user(str(path), "alice", PASSWORD)
    return str(path)


class Running:
    def __init__(self, server: Pop3Server, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.server, self.stop, self.task = server, stop, task

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert (await reader.readline()).startswith(b"+OK")
        return reader, writer


@contextlib.asynccontextmanager
async def start(config: Config, node: int = 0) -> AsyncIterator[Running]:
    server = Pop3Server(config, node=node)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    async with asyncio.timeout(5):
        while not server.is_ready():
            await asyncio.sleep(0.01)
    try:
        yield Running(server, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line + b"\r\n")
    return await asyncio.wait_for(reader.readline(), 5)


async def test_idle_session_is_closed_and_deletes_nothing(tmp_path: Path, users_file: str) -> None:
    path = MaildirStore(tmp_path / "maildir", "h").deliver("alice", "s@example.net", b"Subject: x\r\n\r\nx\r\n")
    async with start(make_config(tmp_path, users_file, idle_timeout=0.3)) as running:
        reader, writer = await running.connect()
        await command(reader, writer, b"USER alice")
        assert (await command(reader, writer, b"PASS " + PASSWORD.encode())).startswith(b"+OK Maildrop")
        assert await command(reader, writer, b"DELE 1") == b"+OK Message 1 deleted\r\n"
        assert await asyncio.wait_for(reader.readline(), 5) == b"-ERR Idle for too long, closing connection\r\n"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert (path.parent.parent / "cur" / f"{path.name}:2,").exists()


async def test_connection_limit(tmp_path: Path, users_file: str) -> None:
    async with start(make_config(tmp_path, users_file, max_connections=1)) as running:
        reader, writer = await running.connect()
        second_reader, second_writer = await asyncio.open_connection("127.0.0.1", running.port)
        assert await asyncio.wait_for(second_reader.read(), 5) == \
            b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
        second_writer.close()
        assert await command(reader, writer, b"QUIT") == b"+OK Bye\r\n"
        writer.close()


async def test_shutdown_tells_the_client_and_keeps_marked_mail(tmp_path: Path, users_file: str) -> None:
    path = MaildirStore(tmp_path / "maildir", "h").deliver("alice", "s@example.net", b"Subject: x\r\n\r\nx\r\n")
    async with start(make_config(tmp_path, users_file)) as running:
        reader, writer = await running.connect()
        await command(reader, writer, b"USER alice")
        await command(reader, writer, b"PASS " + PASSWORD.encode())
        await command(reader, writer, b"DELE 1")
        running.stop.set()
        assert await asyncio.wait_for(reader.readline(), 5) == b"-ERR [SYS/TEMP] Server shutting down\r\n"
        writer.close()
    assert (path.parent.parent / "cur" / f"{path.name}:2,").exists()


async def test_broken_users_file_is_a_temporary_failure(tmp_path: Path) -> None:
    broken = tmp_path / "users"
    broken.write_text("this line is not a user\n")
    async with start(make_config(tmp_path, str(broken))) as running:
        reader, writer = await running.connect()
        await command(reader, writer, b"USER alice")
        assert await command(reader, writer, b"PASS x") == \
            b"-ERR [SYS/TEMP] Authentication temporarily unavailable, try again later\r\n"
        assert await command(reader, writer, b"QUIT") == b"+OK Bye\r\n"
        writer.close()


async def test_a_user_whose_name_cannot_be_a_maildir(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(str(users), ".hidden@example.org", PASSWORD)
    async with start(make_config(tmp_path, str(users))) as running:
        reader, writer = await running.connect()
        await command(reader, writer, b"USER .hidden@example.org")
        assert await command(reader, writer, b"PASS " + PASSWORD.encode()) == \
            b"-ERR [SYS/TEMP] Maildrop temporarily unavailable, try again later\r\n"
        writer.close()


def two_node_configs(tmp_path: Path, users_file: str) -> list[Config]:
    """Node 0 on 127.0.0.1, node 1 on 127.0.0.2, the same POP3 port, each with its own Maildir root."""
    port = free_port()
    hosts = ("127.0.0.1", "127.0.0.2")
    return [config_from_dict({"mailbox": {"maildir_root": str(tmp_path / f"maildir-{node}"),
                                          "nodes": [f"{host}:2424" for host in hosts],
                                          "pop3_listen": [f"{hosts[node]}:{port}"]},
                              "auth": {"users_file": users_file}, "metrics": {"listen": ""}}, environ={})
            for node in (0, 1)]


def user_on(node: int, config: Config) -> str:
    return next(f"u{i}" for i in range(100) if node_for_localpart(f"u{i}", config.mailbox.nodes) == node)


async def test_a_login_on_the_wrong_node_is_proxied_with_pipelined_commands(tmp_path: Path) -> None:
    users = tmp_path / "users"
    configs = two_node_configs(tmp_path, str(users))
    owned_by_1 = user_on(1, configs[0])
    add_user(str(users), owned_by_1, PASSWORD)
    MaildirStore(tmp_path / "maildir-1", "h").deliver(owned_by_1, "s@example.net", b"Subject: on node 1\r\n\r\nx\r\n")
    proxied = REGISTRY.get_sample_value("mtacluster_pop3_sessions_total", {"listener": "pop3", "served": "proxied"})
    async with start(configs[0], 0) as first, start(configs[1], 1):
        reader, writer = await first.connect()
        # Everything in one write: what follows PASS is still in the first node's buffer when it hands over.
        writer.write(f"USER {owned_by_1}\r\nPASS {PASSWORD}\r\nSTAT\r\nRETR 1\r\nQUIT\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    lines = answer.split(b"\r\n")
    assert lines[0] == b"+OK Send your password"
    assert lines[1].startswith(b"+OK Maildrop locked and ready, 1 messages")
    assert lines[2].startswith(b"+OK 1 ")
    assert b"Subject: on node 1" in answer and lines[-2].startswith(b"+OK Bye")
    after = REGISTRY.get_sample_value("mtacluster_pop3_sessions_total", {"listener": "pop3", "served": "proxied"})
    assert (after or 0) == (proxied or 0) + 1


async def test_an_unreachable_owner_is_a_temporary_failure(tmp_path: Path) -> None:
    users = tmp_path / "users"
    config = two_node_configs(tmp_path, str(users))[0]
    owned_by_1 = user_on(1, config)
    add_user(str(users), owned_by_1, PASSWORD)
    failures = REGISTRY.get_sample_value("mtacluster_pop3_logins_total", {"result": "proxy_error"}) or 0
    async with start(config, 0) as first:  # node 1 is not running
        reader, writer = await first.connect()
        await command(reader, writer, f"USER {owned_by_1}".encode())
        assert await command(reader, writer, b"PASS " + PASSWORD.encode()) == \
            b"-ERR [SYS/TEMP] Maildrop temporarily unavailable, try again later\r\n"
        assert await command(reader, writer, b"QUIT") == b"+OK Bye\r\n"
        writer.close()
    assert REGISTRY.get_sample_value("mtacluster_pop3_logins_total", {"result": "proxy_error"}) == failures + 1
