"""How fast a shard carries out `queue flush` (and two overlapping ones) over a large deferred queue.

    python -m benchmarks.queue_admin [--messages 100000] [--directory DIR]

Builds a real SQLite spool with N messages whose one recipient each is deferred for an hour, loads it into a
shard's queue manager (cluster/queue/core.py, no sockets: the admin request goes straight to it), then times
a flush of the whole queue, and two flushes started together (the second finds nothing left to do). Prints
one JSON line with the figures, wall clock and CPU time of this process (spool thread included), since the
wall clock of a shared machine says little. The spool is on the given directory (default: a temporary one), with fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.bus.schemas import BusMessage, OutcomeKind
from cluster.config import config_from_dict
from cluster.queue.core import ShardCore
from cluster.queue.records import LastOutcome, Message, QueueIdFactory, Recipient, State
from cluster.queue.spool import Batch, SqliteSpool

BODY = b"From: a@sender.test\r\nSubject: benchmark\r\n\r\n" + b"x" * 2000 + b"\r\n"
LATER = LastOutcome(OutcomeKind.DEFERRED, 451, "4.3.0", "not now", "mx.later.test[192.0.2.1]")


def build_spool(directory: Path, count: int, now: float) -> None:
    spool = SqliteSpool(directory)
    spool.open()
    ids = QueueIdFactory(0)
    for start in range(0, count, 5000):
        batch = Batch()
        for n in range(start, min(start + 5000, count)):
            message = Message(ids.new(now), "a@sender.test", now,
                              [Recipient(0, f"r{n}@d{n % 50}.test", State.DEFERRED, 1, now + 3600, LATER)], len(BODY))
            batch.add_message(message, BODY)
        spool.commit(batch)
    spool.close()


async def flush_figures(directory: Path) -> dict[str, Any]:
    config = config_from_dict({"metrics": {"listen": ""}}, environ={})

    async def nowhere(identity: bytes, message: BusMessage) -> None:
        return None

    core = ShardCore(config, 0, SqliteSpool(directory), time.time, nowhere)
    started = time.perf_counter()
    await core.load()
    loaded = time.perf_counter() - started
    writer = asyncio.create_task(core.io.run_writer())
    try:
        started, cpu = time.perf_counter(), time.process_time()
        first = await core.admin.handle("flush", {})
        one, one_cpu = time.perf_counter() - started, time.process_time() - cpu
        transactions = core.io.transactions
        for message in core.scheduler.messages.values():  # deferred again, in memory only, for the second run
            for recipient in message.recipients:
                core.scheduler.set_state(message, recipient, State.DEFERRED, time.time() + 3600)
        started = time.perf_counter()
        both = await asyncio.gather(core.admin.handle("flush", {}), core.admin.handle("flush", {}))
        overlapping = time.perf_counter() - started
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await core.close()
    count = first["flushed"]
    return {"messages": len(core.scheduler.messages), "load_seconds": round(loaded, 2),
            "flushed": count, "flush_seconds": round(one, 3), "flush_cpu_seconds": round(one_cpu, 3),
            "flushed_per_second": round(count / one), "flushed_per_cpu_second": round(count / one_cpu),
            "flush_transactions": transactions,
            "overlapping_flushed": [r["flushed"] for r in both], "overlapping_seconds": round(overlapping, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--directory", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.directory) as temporary:
        spool = Path(temporary) / "shard-0"
        started = time.perf_counter()
        build_spool(spool, args.messages, time.time())
        built = time.perf_counter() - started
        figures = asyncio.run(flush_figures(spool))
    print(json.dumps({"build_seconds": round(built, 2), **figures}))


if __name__ == "__main__":
    main()
