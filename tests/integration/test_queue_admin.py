"""Admin operations on a live shard over the bus: list, show, flush, hold, release, delete, bounce."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.bus.schemas import AdminReply, AdminRequest, Deliver, Heartbeat, Outcome, OutcomeKind, Result
from cluster.queue.admin import DEFAULT_LIST_LIMIT
from tests.support.shard import BODY, BusClient, RunningShard, inject, shard_config

pytestmark = pytest.mark.integration


async def admin(client: BusClient, op: str, **args: Any) -> AdminReply:
    """The shard's answer; for "list", with `data` the message list after checking the total and the limit."""
    await client.send(AdminRequest(99, op, args))
    reply = await client.recv_type(AdminReply)
    assert isinstance(reply, AdminReply) and reply.req == 99
    if op == "list" and reply.ok:
        messages = reply.data["messages"]
        assert reply.data["limit"] == args.get("limit", DEFAULT_LIST_LIMIT)
        assert len(messages) == min(reply.data["total"], reply.data["limit"])
        return dataclasses.replace(reply, data=messages)
    return reply


def states(listing: list[dict[str, Any]], queue_id: str) -> list[str]:
    return [r["state"] for m in listing if m["queue_id"] == queue_id for r in m["recipients"]]


async def test_list_show_hold_release_survive_restart(tmp_path: Path) -> None:
    config = shard_config(tmp_path / "spool")
    running = await RunningShard(config).start()
    try:
        cli = running.client()
        stored = await inject(cli, 1, "a@sender.test", ["r1@h.test", "r2@i.test"], BODY)
        listing = await admin(cli, "list")
        assert listing.ok and len(listing.data) == 1
        (message,) = listing.data
        assert message["queue_id"] == stored.queue_id and message["sender"] == "a@sender.test"
        assert message["size"] == len(BODY) and message["arrival"] > 0
        assert message["recipients"][0] == {"address": "r1@h.test", "state": "ready", "attempts": 0,
                                            "next_attempt": 0.0, "last": None, "held_off_until": None}
        assert [m["queue_id"] for m in (await admin(cli, "list", domain="H.test")).data] == [stored.queue_id]
        assert (await admin(cli, "list", domain="other.test")).data == []
        shown = await admin(cli, "show", queue_id=stored.queue_id)
        assert shown.ok and "Subject: hi" in shown.data["headers"] and "hello" not in shown.data["headers"]
        held = await admin(cli, "hold", queue_id=stored.queue_id)
        assert held.ok and held.data == {"queue_id": stored.queue_id, "held": 2}
    finally:
        await running.close()
    running = await RunningShard(config).start()
    try:
        cli, worker = running.client(), running.client()
        assert states((await admin(cli, "list")).data, stored.queue_id) == ["held", "held"]
        await worker.send(Heartbeat("w", 5, []))
        released = await admin(cli, "release", queue_id=stored.queue_id)
        assert released.data == {"queue_id": stored.queue_id, "released": 2}
        assert {(await worker.recv_type(Deliver)).queue_id for _ in range(2)} == {stored.queue_id}
    finally:
        await running.close()


async def test_flush_makes_deferred_ready_now(tmp_path: Path) -> None:
    running = await RunningShard(shard_config(tmp_path / "spool", retry_first=3600, retry_max=3600)).start()
    try:
        cli, worker = running.client(), running.client()
        stored = await inject(cli, 1, "a@sender.test", ["r@j.test"], BODY)
        await worker.send(Heartbeat("w", 5, []))
        job = await worker.recv_type(Deliver)
        await worker.send(Result(job.job_id, "w", [Outcome("r@j.test", OutcomeKind.DEFERRED, 451, "4.3.0", "later")]))
        listing = await cli_wait_state(cli, stored.queue_id, "deferred")
        (recipient,) = listing[0]["recipients"]
        assert recipient["attempts"] == 1
        assert recipient["last"] == {"kind": "deferred", "code": 451, "enhanced": "4.3.0", "text": "later",
                                     "remote": ""}
        assert recipient["next_attempt"] > 0
        assert len((await admin(cli, "list", deferred_only=True)).data) == 1
        flushed = await admin(cli, "flush", domain="j.test")
        assert flushed.ok and flushed.data == {"flushed": 1}
        again = await worker.recv_type(Deliver)
        assert again.queue_id == stored.queue_id and again.attempt == 2
        assert (await admin(cli, "list", deferred_only=True)).data == []
    finally:
        await running.close()


async def cli_wait_state(cli: BusClient, queue_id: str, state: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Ask `list` until the message shows `state` (a deadline, not a number of tries: on a busy machine the
    outcome's transaction may take longer than a few hundred quick round trips)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing: list[dict[str, Any]] = (await admin(cli, "list")).data
        if state in states(listing, queue_id):
            return [m for m in listing if m["queue_id"] == queue_id]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{queue_id} never reached {state} within {timeout}s")


async def test_delete_and_bounce(tmp_path: Path) -> None:
    running = await RunningShard(shard_config(tmp_path / "spool")).start()
    try:
        cli = running.client()
        doomed = await inject(cli, 1, "a@sender.test", ["r@k.test"], BODY)
        returned = await inject(cli, 2, "a@sender.test", ["r1@k.test", "r2@l.test"], BODY)
        deleted = await admin(cli, "delete", queue_id=doomed.queue_id)
        assert deleted.ok and deleted.data == {"queue_id": doomed.queue_id, "deleted": 1}
        bounced = await admin(cli, "bounce", queue_id=returned.queue_id)
        assert bounced.ok and bounced.data == {"queue_id": returned.queue_id, "bounced": 2}
        listing = (await admin(cli, "list")).data
        # Only the DSN is left: from <> to the original sender, reporting both recipients with 5.0.0.
        (dsn,) = listing
        assert dsn["sender"] == "" and [r["address"] for r in dsn["recipients"]] == ["a@sender.test"]
        body = (await running.shard.read_bodies([dsn["queue_id"]]))[dsn["queue_id"]]
        assert body.count(b"Status: 5.0.0") == 2 and b"queue administrator" in body
        for op in ("show", "hold", "release", "delete", "bounce"):
            reply = await admin(cli, op, queue_id=doomed.queue_id)
            assert not reply.ok and reply.error == f"unknown queue id {doomed.queue_id}"
        missing = await admin(cli, "show")
        assert not missing.ok and "queue_id" in missing.error
        unknown = await admin(cli, "explode")
        assert not unknown.ok and "unknown admin operation" in unknown.error
        # Never bounce a bounce: returning the DSN itself makes no new message.
        assert (await admin(cli, "bounce", queue_id=dsn["queue_id"])).ok
        assert (await admin(cli, "list")).data == []
    finally:
        await running.close()


async def test_ping_says_which_shard_and_whether_it_is_ready(tmp_path: Path) -> None:
    running = await RunningShard(shard_config(tmp_path / "spool")).start()
    try:
        reply = await admin(running.client(), "ping")
        assert reply.ok and reply.data == {"shard": 0, "epoch": running.shard.epoch, "ready": True, "state": "serving"}
    finally:
        await running.close()


async def test_list_gives_at_most_limit_messages_and_always_the_total(running_shard: RunningShard) -> None:
    cli = running_shard.client()
    ids = [(await inject(cli, n, "a@sender.test", [f"r@{domain}.test"], BODY)).queue_id
           for n, domain in enumerate(["h", "i", "h", "h"], start=1)]
    for args, total, shown in (({"limit": 2}, 4, ids[:2]), ({}, 4, ids), ({"domain": "h.test", "limit": 2}, 3,
                                                                            [ids[0], ids[2]]),
                               ({"domain": "i.test"}, 1, [ids[1]]), ({"deferred_only": True}, 0, [])):
        await cli.send(AdminRequest(5, "list", args))
        reply = await cli.recv_type(AdminReply)
        assert reply.ok, reply.error
        assert reply.data["total"] == total, args
        assert [m["queue_id"] for m in reply.data["messages"]] == shown, args  # the oldest first
    await cli.send(AdminRequest(6, "list", {"limit": 0}))
    refused = await cli.recv_type(AdminReply)
    assert not refused.ok and "limit" in refused.error
