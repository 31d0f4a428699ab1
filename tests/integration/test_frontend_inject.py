"""The frontend's contract 1 against scripted shards: 250 only after every shard's Stored, else 451/452.

The shards here are real ZeroMQ ROUTER sockets in the test, speaking the real bus schemas, so each test decides
what a shard answers (Stored, InjectRefused, or nothing at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from cluster.bus.ring import shard_for_domain
from cluster.bus.schemas import BusMessage, Inject, InjectRefused
from cluster.config import config_from_dict
from cluster.frontend.server import Frontend
from tests.support.scripted_shard import Answer, ScriptedShard, stored
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

@contextlib.asynccontextmanager
async def frontend_with(answers: list[Answer], inject_timeout: float = 1.0,
                        **smtp: object) -> AsyncIterator[
        tuple[int, list[ScriptedShard], list[str]]]:
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in answers]
    shards = [ScriptedShard(e, a) for e, a in zip(endpoints, answers, strict=True)]
    tasks = [asyncio.create_task(s.serve()) for s in shards]
    port = free_port()
    config = config_from_dict({"smtp": {"listen": [f"127.0.0.1:{port}"], "inject_timeout": inject_timeout, **smtp},
                               "queue": {"shards": endpoints}}, environ={})
    frontend = Frontend(config)
    stop = asyncio.Event()
    running = asyncio.create_task(frontend.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not frontend.is_ready():
            assert asyncio.get_running_loop().time() < deadline, "frontend never became ready"
            await asyncio.sleep(0.02)
        yield port, shards, endpoints
    finally:
        stop.set()
        await running
        for task in tasks:
            task.cancel()
        for shard in shards:
            shard.socket.close(linger=0)


def send(port: int, recipients: list[str]) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        code, text = client.data(b"Subject: x\r\n\r\nbody\r\n")
        return code, text


def split_domains(endpoints: list[str]) -> tuple[str, str]:
    owners: dict[int, str] = {}
    for i in range(200):
        owners.setdefault(shard_for_domain(f"d{i}.test", endpoints), f"d{i}.test")
    return owners[0], owners[1]


async def test_250_after_every_shard_stored_its_part(tmp_path: Path) -> None:
    async with frontend_with([stored, stored]) as (port, shards, endpoints):
        domain0, domain1 = split_domains(endpoints)
        code, text = await asyncio.to_thread(send, port, [f"a@{domain0}", f"b@{domain1}", f"c@{domain1}"])
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as Q")
        assert [i.recipients for i in shards[0].injects] == [[f"a@{domain0}"]]
        assert [i.recipients for i in shards[1].injects] == [[f"b@{domain1}", f"c@{domain1}"]]
        body = shards[0].injects[0].body
        assert body.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
        assert body.endswith(b"Subject: x\r\n\r\nbody\r\n")
        assert shards[0].injects[0].sender == "sender@client.test"


async def test_451_when_one_shard_never_answers(tmp_path: Path) -> None:
    async with frontend_with([stored, lambda m: None], inject_timeout=0.5) as (port, _, endpoints):
        domain0, domain1 = split_domains(endpoints)
        code, text = await asyncio.to_thread(send, port, [f"a@{domain0}", f"b@{domain1}"])
        assert (code, text[:5]) == (451, b"4.3.0")


async def test_shard_refusal_is_passed_on(tmp_path: Path) -> None:
    def disk_full(message: Inject) -> BusMessage:
        return InjectRefused(req=message.req, code=452, enhanced="4.3.1", text="Insufficient system storage")

    async with frontend_with([disk_full]) as (port, _, _):
        code, text = await asyncio.to_thread(send, port, ["a@x.test"])
        assert (code, text) == (452, b"4.3.1 Insufficient system storage")


async def test_connections_over_the_per_client_limit_get_421() -> None:
    async with frontend_with([stored], max_connections_per_client=2) as (port, _, _):
        first = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=10)
        second = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=10)
        try:
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=10)
            assert refused.value.smtp_code == 421 and refused.value.smtp_error.startswith(b"4.7.0")
            # Another address is not affected by this client's limit.
            other = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=10,
                                            source_address=("127.0.0.9", 0))
            other.close()
        finally:
            first.close()
            second.close()


async def test_timeout_waiting_for_a_command_closes_with_421() -> None:
    async with frontend_with([stored], command_timeout=1) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await reader.readline()
        assert greeting.startswith(b"220 ")
        farewell = await asyncio.wait_for(reader.read(1000), 10)
        assert farewell.startswith(b"421 4.4.2")
        assert await reader.read(1000) == b""
        writer.close()


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_commands_and_replies_are_counted_by_each_end_of_data_and_by_the_end_of_the_session() -> None:
    commands = "mtacluster_smtp_commands_total"
    replies_total = "mtacluster_smtp_replies_total"
    rcpt, quit_, ok, go_ahead = ({"command": "RCPT"}, {"command": "QUIT"}, {"class": "2xx"}, {"class": "3xx"})
    before = {key: _sample(name, labels) for key, (name, labels) in
              {"rcpt": (commands, rcpt), "quit": (commands, quit_), "2xx": (replies_total, ok),
               "3xx": (replies_total, go_ahead)}.items()}
    async with frontend_with([stored]) as (port, _, _):
        client = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=10)
        try:
            await asyncio.to_thread(client.ehlo, "client.test")
            await asyncio.to_thread(client.mail, "sender@client.test")
            for recipient in ("a@x.test", "b@x.test"):
                await asyncio.to_thread(client.rcpt, recipient)
            code, _ = await asyncio.to_thread(client.data, b"Subject: x\r\n\r\nbody\r\n")
            assert code == 250
            # Counted by the end of DATA, while the session is still open.
            assert _sample(commands, rcpt) == before["rcpt"] + 2
            assert _sample(replies_total, go_ahead) == before["3xx"] + 1
            assert _sample(replies_total, ok) == before["2xx"] + 5  # 220, EHLO, MAIL, two RCPT: not yet the 250
        finally:
            await asyncio.to_thread(client.quit)
        await _until(lambda: _sample(commands, quit_) == before["quit"] + 1, "QUIT never counted")
        await _until(lambda: _sample(replies_total, ok) == before["2xx"] + 7, "replies never all counted")
