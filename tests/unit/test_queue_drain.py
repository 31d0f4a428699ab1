"""Draining (cluster/queue/drain.py, cluster/bus/ring.py): the ring without a shard, and exactly-once receiving.

A Transfer is stored once under its queue id and hop count: a resend while it is queued, after it finished
and left the queue, and after a restart of the receiver (the journal in the spool directory) is answered
Stored without storing it again (ARCHITECTURE.md contract 7).
"""

from __future__ import annotations

import asyncio
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


def transfer(hops: int = 1, req: int = 7) -> Transfer:
    return Transfer(req, "01ABCDEFGHJK0002", hops, "a@sender.test", 1_700_000_000.0, True,
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


async def _core(directory: Path) -> ShardCore:
    config = config_from_dict({"queue": {"shards": SHARDS, "spool_dir": str(directory)},
                               "metrics": {"listen": ""}}, environ={})
    sent: list[object] = []

    async def send(identity: bytes, message: object) -> None:
        sent.append(message)

    core = ShardCore(config, 0, MemorySpool(), lambda: 1_700_000_100.0, send, directory=directory)
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
