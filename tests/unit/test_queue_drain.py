"""Draining (cluster/queue/drain.py, cluster/bus/ring.py): the ring without a shard, and exactly-once receiving.

A Transfer is stored once under its queue id and hop count: a resend while it is queued, after it finished
and left the queue, and after a restart of the receiver (the journal in the spool directory) is answered
Stored without storing it again (ARCHITECTURE.md contract 7).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.bus.ring import shard_for_domain
from cluster.bus.schemas import SchemaError, Stored, Transfer, decode
from cluster.config import config_from_dict
from cluster.frontend.injector import ShardClient
from cluster.queue.core import ShardCore
from cluster.queue.memspool import MemorySpool
from cluster.queue.records import State

BODY = b"Message-ID: <t1@sender.test>\r\n\r\nhello\r\n"
SHARDS = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]


def transfer(hops: int = 1, req: int = 7, queue_id: str = "01ABCDEFGHJK0002") -> Transfer:
    return Transfer(req, queue_id, hops, "a@sender.test", 1_700_000_000.0, True,
                    {"hops": str(hops), "transferred_from": "2"},
                    [{"address": "x@d1.test", "state": "deferred", "attempts": 3, "next_attempt": 1_700_000_600.0,
                      "last": {"kind": "deferred", "code": 451, "enhanced": "4.4.1", "text": "try later",
                               "remote": "mx"}},
                     {"address": "y@d1.test", "state": "held", "attempts": 0, "next_attempt": 0.0, "last": None}],
                    BODY)


def test_the_ring_without_a_shard_moves_only_its_domains() -> None:
    domains = [f"d{i}.test" for i in range(300)]
    moved = 0
    for domain in domains:
        owner = shard_for_domain(domain, SHARDS)
        without = shard_for_domain(domain, SHARDS, frozenset({2}))
        assert without != 2
        if owner != 2:
            assert without == owner, domain
        else:
            moved += 1
    assert 50 < moved < 150
    assert shard_for_domain("d1.test", SHARDS, frozenset({0, 1, 2})) in range(3)


def test_a_transfer_round_trips_and_bad_ones_are_schema_errors() -> None:
    assert decode(transfer().encode()) == transfer()
    bad = transfer()
    for recipients in ([{"address": "x@d1.test", "state": "in_flight"}], [{"address": "nodomain", "state": "ready"}],
                       [{"address": "x@d1.test", "state": "ready", "attempts": -1}], []):
        frame = Transfer(1, bad.queue_id, 1, bad.sender, bad.arrival, False, {}, recipients, BODY).encode()
        with pytest.raises(SchemaError):
            decode(frame)


async def _core(directory: Path, clock: Callable[[], float] = lambda: 1_700_000_100.0) -> ShardCore:
    config = config_from_dict({"queue": {"shards": SHARDS, "spool_dir": str(directory)},
                               "metrics": {"listen": ""}}, environ={})
    sent: list[object] = []

    async def send(identity: bytes, message: object) -> None:
        sent.append(message)

    core = ShardCore(config, 0, MemorySpool(), clock, send, directory=directory)
    await core.load()
    return core


async def _receive(core: ShardCore, message: Transfer) -> object:
    writer = asyncio.create_task(core.io.run_writer())
    try:
        return await core.drain.receive(message, lambda: False)
    finally:
        writer.cancel()


async def test_a_transfer_is_stored_once_with_its_state(tmp_path: Path) -> None:
    core = await _core(tmp_path)
    answers = await asyncio.gather(_receive(core, transfer()), _receive(core, transfer()))
    assert all(isinstance(a, Stored) and a.queue_id == "01ABCDEFGHJK0002" for a in answers)
    assert list(core.scheduler.messages) == ["01ABCDEFGHJK0002"]
    message = core.scheduler.messages["01ABCDEFGHJK0002"]
    first, second = message.recipients
    assert (first.state, first.attempts, first.next_attempt) == (State.DEFERRED, 3, 1_700_000_600.0)
    assert first.last is not None and (first.last.code, first.last.text) == (451, "try later")
    assert second.state is State.HELD and message.warned and message.arrival == 1_700_000_000.0

    # Delivered and gone: a resend of the same hop (its sender crashed before deleting) is not stored again,
    # also after this shard restarts (the journal), while a later hop of the same message is.
    core.scheduler.remove_message("01ABCDEFGHJK0002")
    again = await _core(tmp_path)
    assert isinstance(await _receive(again, transfer()), Stored)
    assert not again.scheduler.messages
    assert isinstance(await _receive(again, transfer(hops=2)), Stored)
    assert list(again.scheduler.messages) == ["01ABCDEFGHJK0002"]


async def test_a_frontend_counts_a_drained_shard_as_reachable_even_when_it_is_gone() -> None:
    """A drained shard's pod scaled away before queue.shards is shortened must not make every frontend unready;
    a draining one still must answer (it holds mail)."""
    client = ShardClient(SHARDS, 1.0)
    try:
        for index in range(3):  # every shard said it is ready; none has been heard from since (gone)
            client._ready[index] = True
        assert not client.all_reachable() and len(client.unreachable()) == 3
        client._note_state(2, "draining")
        assert client.unreachable() == SHARDS
        client._note_state(2, "drained")
        assert client.unreachable() == SHARDS[:2] and 2 in client.excluded
        client._note_state(0, "drained")
        client._note_state(1, "drained")
        assert client.all_reachable()
        client._note_state(2, "serving")  # undrained: it must answer again
        assert client.unreachable() == SHARDS[2:] and 2 not in client.excluded
    finally:
        await client.close()


def journal_keys(directory: Path) -> list[str]:
    path = directory / "transfers-received"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


async def test_the_journal_forgets_keys_their_senders_confirmed_and_keys_older_than_max_lifetime(
        tmp_path: Path) -> None:
    """journal.py's rule: a key goes when its sender confirms it deleted its copy (it never sends it again), or
    queue.max_lifetime after it was received; until then a resend is answered without storing, also after a
    restart. The trim runs from the maintenance tick."""
    now = [1_700_000_100.0]
    core = await _core(tmp_path, lambda: now[0])
    first, second = transfer(queue_id="01ABCDEFGHJK0003"), transfer(queue_id="01ABCDEFGHJK0004")
    for message in (first, second):
        assert isinstance(await _receive(core, message), Stored)
    assert journal_keys(tmp_path) == ["01ABCDEFGHJK0003#1", "01ABCDEFGHJK0004#1"]
    for queue_id in list(core.scheduler.messages):  # delivered and gone: only the journal remembers them
        core.scheduler.remove_message(queue_id)

    answer = await core.drain.handle_admin("transfers_confirmed", {"keys": ["01ABCDEFGHJK0003#1", "other#1"]})
    assert answer["confirmed"] == 1
    now[0] += 60
    core.drain.tick()
    await core.idle()
    assert journal_keys(tmp_path) == ["01ABCDEFGHJK0004#1"]

    # After a restart: the unconfirmed key still makes a resend harmless.
    again = await _core(tmp_path, lambda: now[0])
    assert isinstance(await _receive(again, second), Stored) and not again.scheduler.messages
    # max_lifetime after it was received, it is forgotten too (its sender would have long deleted it).
    now[0] = 1_700_000_100.0 + again.config.queue.max_lifetime + 1
    again.drain.tick()
    await again.idle()
    assert journal_keys(tmp_path) == [] and len(again.drain.journal) == 0
    # A key received after the trim is journaled as before.
    assert isinstance(await _receive(again, transfer(queue_id="01ABCDEFGHJK0005")), Stored)
    assert journal_keys(tmp_path) == ["01ABCDEFGHJK0005#1"]


async def test_a_journal_from_before_timestamps_is_read_as_received_at_load(tmp_path: Path) -> None:
    (tmp_path / "transfers-received").write_text("01ABCDEFGHJK0002#1\n")
    core = await _core(tmp_path)
    assert isinstance(await _receive(core, transfer()), Stored) and not core.scheduler.messages
    assert "01ABCDEFGHJK0002#1" in core.drain.journal
