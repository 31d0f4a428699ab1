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
from cluster.frontend.policy import SessionFacts, SessionPolicy
from cluster.frontend.server import Frontend
from cluster.smtp import replies
from cluster.smtp.address import Address
from cluster.smtp.replies import Reply
from tests.support.scripted_shard import Answer, ScriptedShard, stored
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

@contextlib.asynccontextmanager
async def frontend_with(answers: list[Answer], inject_timeout: float = 1.0, checks: tuple[SessionPolicy, ...] = (),
                        **smtp: object) -> AsyncIterator[
        tuple[int, list[ScriptedShard], list[str]]]:
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in answers]
    shards = [ScriptedShard(e, a) for e, a in zip(endpoints, answers, strict=True)]
    tasks = [asyncio.create_task(s.serve()) for s in shards]
    port = free_port()
    config = config_from_dict({"smtp": {"listen": [f"127.0.0.1:{port}"], "inject_timeout": inject_timeout, **smtp},
                               "queue": {"shards": endpoints}}, environ={})
    frontend = Frontend(config, checks)
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


@pytest.mark.parametrize(("command_timeout", "data_timeout"), [(60, 1), (1, 60)])
async def test_the_data_timeout_runs_while_the_message_is_read_and_the_command_timeout_otherwise(
        command_timeout: int, data_timeout: int) -> None:
    """RFC 5321 4.5.3.2: within DATA only the data timeout applies (here the short one or the long one); the
    command timeout applies again once the message is answered."""
    async with frontend_with([stored], command_timeout=command_timeout, data_timeout=data_timeout) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")
        writer.write(b"HELO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n")
        replies = b""
        while replies.count(b"\r\n") < 4:
            replies += await asyncio.wait_for(reader.readline(), 10)
        assert replies.splitlines()[-1].startswith(b"354")
        writer.write(b"Subject: half a message\r\n")
        if data_timeout == 1:
            assert (await asyncio.wait_for(reader.read(1000), 10)).startswith(b"421 4.4.2")
        else:  # the short command timeout does not cut the message, and applies once it is answered
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1000), 2.5)
            writer.write(b"\r\nbody\r\n.\r\n")
            assert (await _reply(reader)).startswith(b"250 ")
            assert (await asyncio.wait_for(reader.read(1000), 10)).startswith(b"421 4.4.2")
        writer.close()


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_commands_and_replies_are_counted_as_they_happen_and_seen_at_every_read() -> None:
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
            # Every command and reply so far, while the session is still open.
            assert _sample(commands, rcpt) == before["rcpt"] + 2
            assert _sample(replies_total, go_ahead) == before["3xx"] + 1
            assert _sample(replies_total, ok) == before["2xx"] + 6  # 220, EHLO, MAIL, two RCPT, the 250
        finally:
            await asyncio.to_thread(client.quit)
        await _until(lambda: _sample(commands, quit_) == before["quit"] + 1, "QUIT never counted")
        await _until(lambda: _sample(replies_total, ok) == before["2xx"] + 7, "replies never all counted")


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (its last line has a space after the code)."""
    lines = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        lines += line
        if len(line) < 4 or line[3:4] != b"-":
            return lines


async def test_stopping_tells_idle_sessions_421_and_lets_a_storing_session_answer_first() -> None:
    # The shard never answers: the storing session's answer is the 451 at inject_timeout, then 421.
    async with frontend_with([lambda message: None], inject_timeout=1.5) as (port, shards, _):
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(idle_reader)).startswith(b"220 ")
        idle_writer.write(b"EHLO idle.test\r\n")
        assert (await _reply(idle_reader)).startswith(b"250-")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")
        writer.write(b"EHLO busy.test\r\nMAIL FROM:<s@client.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n")
        for _ in range(4):
            assert (await _reply(reader))[:1] in (b"2", b"3")
        writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        await _until(lambda: bool(shards[0].injects), "the shard got the message")
    # Leaving the block stopped the frontend: it returned only once both sessions were answered and closed.
    assert (await _reply(idle_reader)).startswith(b"421 4.3.2 ")
    assert (await _reply(reader)).startswith(b"451 4.3.0 ")
    assert (await _reply(reader)).startswith(b"421 4.3.2 ")
    assert await reader.read() == b"" and await idle_reader.read() == b""
    writer.close()
    idle_writer.close()


async def test_a_client_gone_while_its_message_is_stored_leaves_nothing_behind() -> None:
    # The shard answers only the second message: the first client is gone by then, and its session must not
    # count against the per-client limit (1) afterwards.
    answered: list[Inject] = []

    def second_only(message: Inject) -> BusMessage | None:
        answered.append(message)
        return stored(message) if len(answered) > 1 else None

    async with frontend_with([second_only], inject_timeout=0.5, max_connections_per_client=1) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")
        writer.write(b"HELO gone.test\r\nMAIL FROM:<s@client.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n")
        for _ in range(4):
            await _reply(reader)
        writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        await _until(lambda: bool(answered), "the shard got the first message")
        writer.close()
        current = _sample("mtacluster_smtp_connections_current", {})
        await _until(lambda: _sample("mtacluster_smtp_connections_current", {}) == current - 1,
                     "the session was released after its store gave up")
        code, _text = await asyncio.to_thread(send, port, ["a@x.test"])
        assert code == 250


class SlowRecipientCheck(SessionPolicy):
    """Takes its time over every RCPT (as a DNS or shard look-up would) and refuses one address."""

    async def check_rcpt(self, facts: SessionFacts, recipient: Address) -> Reply | None:
        await asyncio.sleep(0.05)
        return replies.RELAY_DENIED if recipient.local_part == "refused" else None


async def test_pipelined_commands_behind_a_check_that_waits_are_answered_in_order() -> None:
    async with frontend_with([stored], checks=(SlowRecipientCheck(),)) as (port, shards, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")
        writer.write(b"EHLO pipe.test\r\n")
        await _reply(reader)
        # RFC 2920: the whole transaction in one write; the RCPTs wait for the check while the rest is buffered.
        writer.write(b"MAIL FROM:<s@client.test>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<refused@x.test>\r\n"
                     b"RCPT TO:<b@x.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        answers = [(await _reply(reader))[:9] for _ in range(7)]
        assert answers == [b"250 2.1.0", b"250 2.1.5", b"554 5.7.1", b"250 2.1.5", b"354 End d",
                           b"250 2.0.0", b"221 2.0.0"]
        assert [inject.recipients for inject in shards[0].injects] == [["a@x.test", "b@x.test"]]
        writer.close()
