"""Handing a draining shard's owned state to its new owners (cluster/queue/handover.py, issue 14).

Per-user sending counters move to the owner of the user name on the ring without the draining shard, with
their time and counts, exactly once: a resend (the sender crashed after the owner committed, before deleting
its copy) is not counted twice, and an owner that does not answer leaves the entries where they were. The
ring's `shard_for_key` skips excluded shards like `shard_for_domain`, and moves only their keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from cluster.bus.client import BusLink, NoAnswer
from cluster.bus.ring import shard_for_key
from cluster.bus.schemas import AdminReply, BusMessage
from cluster.config import config_from_dict
from cluster.queue.core import ShardCore
from cluster.queue.handover import HandoverError
from cluster.queue.memspool import MemorySpool
from cluster.queue.spool import Batch
from cluster.queue.usage import UsageEntry

SHARDS = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]
NOW = 1_700_000_100.0


class CoreLink:
    """Stands for the bus link to one shard: an admin request goes straight to that shard's core."""

    def __init__(self, core: ShardCore | None) -> None:
        self.core = core
        self.asked = 0

    async def request(self, build: Callable[[int], BusMessage], timeout: float) -> BusMessage:
        self.asked += 1
        if self.core is None:
            raise NoAnswer(cast(BusLink, self), timeout, True)
        request: Any = build(1)
        data = await self.core.drain.handle_admin(request.op, request.args)
        return AdminReply(request.req, True, data, "")

    endpoint = "tcp://test"
    name = "test link"


async def _core(index: int, directory: Path) -> tuple[ShardCore, asyncio.Task[None]]:
    config = config_from_dict({"queue": {"shards": SHARDS, "spool_dir": str(directory)},
                               "metrics": {"listen": ""}, "suppression": {"ttl": 86400}}, environ={})

    async def send(identity: bytes, message: object) -> None:
        return None

    core = ShardCore(config, index, MemorySpool(), lambda: NOW, send, directory=directory / f"shard-{index}")
    await core.load()
    return core, asyncio.create_task(core.io.run_writer())


def test_shard_for_key_skips_excluded_shards_and_moves_only_their_keys() -> None:
    users = [f"user{i}" for i in range(300)]
    moved = 0
    for user in users:
        owner = shard_for_key(user, SHARDS)
        without = shard_for_key(user.upper(), SHARDS, frozenset({2}))
        assert without != 2
        if owner == 2:
            moved += 1
        else:
            assert without == owner, user
    assert 50 < moved < 150


async def test_usage_counters_move_to_the_new_owner_exactly_once(tmp_path: Path) -> None:
    cores = [await _core(i, tmp_path) for i in range(3)]
    source = cores[2][0]
    try:
        # Users owned by shard 2 now; each has messages counted there within the window.
        users = [u for u in (f"user{i}" for i in range(40)) if shard_for_key(u, SHARDS) == 2][:6]
        entries = [UsageEntry(f"{u}.{n}", u, NOW - 3600 * n, 1, 2 + n) for u in users for n in range(3)]
        await source.io.commit(Batch(usage_adds=entries))
        source.accounts.load(entries)
        before = {u: source.accounts.usage(u) for u in users}
        assert all(v == {"messages": 3, "recipients": 9} for v in before.values())

        await source.drain.handle_admin("drain", {})
        links = [CoreLink(core) for core, _ in cores]
        assert await source.drain.handover.hand_over(cast(list[BusLink], links), SHARDS, frozenset({2}))

        assert len(source.accounts.ledger) == 0 and not await source.io.load_usage()
        for user in users:
            owner = cores[shard_for_key(user, SHARDS, frozenset({2}))][0]
            assert owner.accounts.usage(user) == before[user], user
        assert links[2].asked == 0

        # The source crashed after the owners committed, before deleting its copies: it sends them again.
        source.accounts.load(entries)
        assert await source.drain.handover.hand_over(cast(list[BusLink], links), SHARDS, frozenset({2}))
        for user in users:
            owner = cores[shard_for_key(user, SHARDS, frozenset({2}))][0]
            assert owner.accounts.usage(user) == before[user], f"{user} counted twice"
            assert owner.index != 2
        # The owners committed them: they survive a restart of the owner.
        for core, _ in cores[:2]:
            assert sorted(e.entry_id for e in await core.io.load_usage()) == sorted(
                e.entry_id for e in entries if shard_for_key(e.user, SHARDS, frozenset({2})) == core.index)
    finally:
        for _, writer in cores:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)


async def test_an_owner_that_does_not_answer_leaves_the_entries_in_place(tmp_path: Path) -> None:
    cores = [await _core(i, tmp_path) for i in range(3)]
    source = cores[2][0]
    try:
        users = [u for u in (f"user{i}" for i in range(40)) if shard_for_key(u, SHARDS) == 2][:4]
        entries = [UsageEntry(f"{u}.1", u, NOW - 60, 1, 1) for u in users]
        source.accounts.load(entries)
        await source.drain.handle_admin("drain", {})
        links = [CoreLink(None), CoreLink(None), CoreLink(source)]
        assert not await source.drain.handover.hand_over(cast(list[BusLink], links), SHARDS, frozenset({2}))
        assert len(source.accounts.ledger) == len(entries)
        assert source.drain.status()["state_entries"] == len(entries)
        # The shard is not drained while it still holds counters, even with an empty queue.
        source.drain._links = cast(list[BusLink], links)
        await source.drain._finish()
        assert source.drain.state == "draining"
    finally:
        for _, writer in cores:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)


async def test_an_import_with_a_malformed_entry_is_refused_whole_and_names_the_entry(tmp_path: Path) -> None:
    core, writer = await _core(0, tmp_path)
    try:
        good = {"entry_id": "u.1", "user": "User", "at": NOW, "messages": 1, "recipients": 2}
        for bad in ({"entry_id": "u.2", "user": "u"},  # fields missing
                    {**good, "entry_id": "u.3", "messages": "1"},  # a count that is not a number
                    {**good, "entry_id": ""},  # no id to import it once by
                    "not a mapping"):
            with pytest.raises(HandoverError, match="not a usage entry"):
                await core.drain.handover.import_usage({"entries": [good, bad]})
        assert core.accounts.usage("user") == {"messages": 0, "recipients": 0}  # nothing of a refused import
        with pytest.raises(HandoverError, match="needs a list"):
            await core.drain.handover.import_usage({"entries": good})
        assert (await core.drain.handover.import_usage({"entries": [good]}))["imported"] == 1
        assert core.accounts.usage("user") == {"messages": 1, "recipients": 2}

        entry = {"address": "a@b.test", "category": "InvalidRecipient", "reply": "550 5.1.1 no", "since": NOW,
                 "until": NOW + 60}
        for bad in ({**entry, "until": "later"}, {"address": "a@b.test"}):
            with pytest.raises(HandoverError, match="not a suppression entry"):
                core.drain.handover.import_suppression({"entries": [bad]})
        assert core.drain.handover.import_suppression({"entries": [entry]})["imported"] == 1
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
