"""The shard side of accounts through `ShardCore.handle` (no sockets): an in-memory spool, a virtual clock.

Reserve -> Granted/Refused with the usage committed before the answer; counts survive a restart of the core on
the same spool; Release takes an entry back; entries older than 24 hours stop counting and are pruned from the
spool; AuthFailures blocks an address after the limit; the admin op "user_usage" reports the window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cluster.bus.schemas import (
    AdminReply,
    AdminRequest,
    AuthFailures,
    AuthStatus,
    BusMessage,
    Granted,
    Refused,
    Release,
    Released,
    Reserve,
)
from cluster.config import config_from_dict
from cluster.queue.core import ShardCore
from cluster.queue.memspool import MemorySpool

FRONTEND = b"frontend"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def core_on(spool: MemorySpool, clock: Clock) -> AsyncIterator[tuple[ShardCore, list[BusMessage]]]:
    sent: list[BusMessage] = []

    async def send(identity: bytes, message: BusMessage) -> None:
        sent.append(message)

    core = ShardCore(config_from_dict({"metrics": {"listen": ""}}, environ={}), 0, spool, clock, send)
    await core.load()
    writer = asyncio.create_task(core.io.run_writer())
    try:
        yield core, sent
    finally:
        await core.settle(5)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await core.close()


async def ask(core: ShardCore, sent: list[BusMessage], message: BusMessage) -> BusMessage:
    await core.handle(FRONTEND, message)
    await core.idle()
    return sent.pop()


async def test_usage_is_durable_released_and_expires() -> None:
    spool, clock = MemorySpool(), Clock()
    async with core_on(spool, clock) as (core, sent):
        for n in range(2):
            assert isinstance(await ask(core, sent, Reserve(n, "alice", 1, 4, 3, 0, f"e{n}")), Granted)
        assert spool.commits >= 2
    async with core_on(spool, clock) as (core, sent):  # a restart on the same spool
        answer = await ask(core, sent, Reserve(5, "Alice", 1, 1, 3, 0, "e5"))
        assert answer == Granted(5, "e5", 3, 9)
        refused = await ask(core, sent, Reserve(6, "alice", 1, 0, 3, 0))
        assert refused == Refused(6, "messages", 3, 9)
        assert await ask(core, sent, Release(7, "e5")) == Released(7, True)
        usage = await ask(core, sent, AdminRequest(8, "user_usage", {"user": "alice"}))
        assert isinstance(usage, AdminReply) and usage.data == {"messages": 2, "recipients": 8}
        clock.now += 24 * 3600 + 1
        core.tick(1e9)  # prunes what left the window
        await core.idle()
        assert spool.load_usage() == []
        assert isinstance(await ask(core, sent, Reserve(9, "alice", 1, 0, 3, 0)), Granted)


async def test_auth_failures_block_an_address() -> None:
    async with core_on(MemorySpool(), Clock()) as (core, sent):
        for n in range(2):
            assert await ask(core, sent, AuthFailures(n, "192.0.2.7", 1, 60.0, 2)) == AuthStatus(n, n + 1,
                                                                                               60.0 if n else 0.0)
        status = await ask(core, sent, AuthFailures(3, "192.0.2.7", 0, 60.0, 2))
        assert isinstance(status, AuthStatus) and status.blocked_for == 60.0
