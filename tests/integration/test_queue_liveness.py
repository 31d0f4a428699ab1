"""A real shard (in-process, real sockets) under the faults of issue 8: a pause longer than worker_timeout,
and a clean stop with jobs in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import zmq

from cluster.bus.schemas import Deliver, Heartbeat, HeartbeatAck, Outcome, OutcomeKind, Result
from cluster.queue.records import State
from cluster.queue.spool import SqliteSpool
from tests.support.shard import BODY, RunningShard, inject, shard_config, until

pytestmark = pytest.mark.integration


async def test_a_paused_shard_reads_waiting_heartbeats_before_judging_anyone_silent(tmp_path: Path) -> None:
    running = await RunningShard(shard_config(tmp_path / "spool", worker_timeout=1)).start()
    worker = running.client()
    beating = threading.Event()
    stop_beating = threading.Event()
    try:
        stored = await inject(running.client(), 1, "s@sender.test", ["r@paused.test"], BODY)
        await worker.send(Heartbeat("w", 1, [], sent=time.monotonic()))
        ack = await worker.recv_type(HeartbeatAck)
        job = await worker.recv_type(Deliver)

        def beat() -> None:
            """The worker keeps heartbeating (listing its job) from another socket while the shard is paused."""
            context = zmq.Context()
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(running.endpoint)
            try:
                while not stop_beating.is_set():
                    socket.send(Heartbeat("w", 0, [job.job_id], seen=job.seq, seen_epoch=ack.shard_epoch,
                                          incarnation=ack.incarnation, sent=time.monotonic()).encode())
                    beating.set()
                    stop_beating.wait(0.1)
            finally:
                socket.close(0)
                context.term()

        thread = threading.Thread(target=beat)
        thread.start()
        assert beating.wait(5)
        time.sleep(3)  # the fault: the shard's event loop is frozen for 3x worker_timeout, as by SIGSTOP
        await until(lambda: running.shard.scheduler.workers["w"].last_seen > time.time() - 0.5, 5,
                    "the waiting heartbeats to be read")
        assert running.shard.scheduler.leases_expired == 0, "a worker was judged silent before its mail was read"
        assert running.shard.scheduler.jobs[job.job_id].worker == "w"
        assert running.shard.scheduler.messages[stored.queue_id].recipients[0].state is State.IN_FLIGHT
    finally:
        stop_beating.set()
        await running.close()


async def test_the_time_a_shard_was_stalled_is_not_held_against_its_workers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What workers sent during a pause may reach the shard after it resumes (ZeroMQ's I/O thread catches up
    first): a worker silent only while the shard was stalled keeps its jobs."""
    running = await RunningShard(shard_config(tmp_path / "spool", worker_timeout=1)).start()
    worker = running.client()
    try:
        await inject(running.client(), 1, "s@sender.test", ["r@stalled.test"], BODY)
        await worker.send(Heartbeat("w", 1, [], sent=time.monotonic()))
        ack = await worker.recv_type(HeartbeatAck)
        job = await worker.recv_type(Deliver)
        time.sleep(3)  # the fault: the shard's event loop is frozen for 3x worker_timeout; nothing arrives
        # The shard resumes and ticks (expiry included, in the same turn as the stall is noticed) before the
        # worker's next heartbeat arrives.
        await until(lambda: "was stalled" in caplog.text, 5, "the shard to notice its stall")
        assert running.shard.scheduler.leases_expired == 0, "the shard's own stall was taken for worker silence"
        await worker.send(Heartbeat("w", 0, [job.job_id], seen=job.seq, seen_epoch=ack.shard_epoch,
                                    incarnation=ack.incarnation, sent=time.monotonic()))
        await worker.recv_type(HeartbeatAck)
        assert running.shard.scheduler.jobs[job.job_id].worker == "w"
    finally:
        await running.close()


async def test_a_clean_stop_waits_for_the_jobs_in_flight_and_dispatches_nothing_more(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    running = await RunningShard(shard_config(spool_dir)).start()
    frontend, worker = running.client(), running.client()
    first = await inject(frontend, 1, "s@sender.test", ["r@first.test"], BODY)
    await worker.send(Heartbeat("w", 1, []))
    job = await worker.recv_type(Deliver)
    running.stop.set()  # SIGTERM while the job is in flight
    await until(lambda: not running.shard.core.dispatcher.enabled, 5, "dispatching to stop")
    second = await inject(frontend, 2, "s@sender.test", ["r@second.test"], BODY)
    await worker.send(Heartbeat("w", 5, [job.job_id], sent=time.monotonic()))
    await worker.recv_type(HeartbeatAck)
    await worker.send(Result(job.job_id, "w", [Outcome("r@first.test", OutcomeKind.DELIVERED, 250, "2.0.0", "ok")]))
    assert running.task is not None
    await asyncio.wait_for(running.task, 15)
    for client in running.clients:
        client.close()
    spool = SqliteSpool(spool_dir / "shard-0")
    spool.open()
    try:
        left = {m.queue_id: [r.state for r in m.recipients] for m in spool.load().messages}
    finally:
        spool.close()
    assert first.queue_id not in left  # delivered and removed before the shard stopped
    assert left[second.queue_id] == [State.READY]  # never dispatched once stopping
