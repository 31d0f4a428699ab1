"""Bounces on live shards: expiry (4.4.7), the outbox to the sender's shard, delay warnings, backoff."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from cluster.bus.ring import shard_for_domain
from cluster.bus.schemas import Deliver, Heartbeat, Outcome, Result
from cluster.queue.records import State
from tests.support.dsn import status_blocks
from tests.support.shard import BODY, BusClient, RunningShard, inject, shard_config, until

pytestmark = pytest.mark.integration


def domain_of_shard(index: int, shards: tuple[str, ...], prefix: str) -> str:
    return next(f"{prefix}{n}.test" for n in range(1000) if shard_for_domain(f"{prefix}{n}.test", shards) == index)


async def defer(worker: BusClient, name: str, text: str = "try later") -> Deliver:
    job: Deliver = await worker.recv_type(Deliver)
    await worker.send(Result(job.job_id, name, [Outcome(r, "deferred", 421, "4.4.2", text, "mx.x.test[192.0.2.9]")
                                                for r in job.recipients]))
    return job


async def test_expired_recipient_fails_with_4_4_7_and_bounces(tmp_path: Path) -> None:
    running = await RunningShard(shard_config(tmp_path / "spool", retry_first=0.2, retry_max=0.2,
                                              max_lifetime=1)).start()
    try:
        cli, worker = running.client(), running.client()
        stored = await inject(cli, 1, "s@sender.test", ["r@slow.test"], BODY)
        await worker.send(Heartbeat("w", 5, []))
        while True:
            job = await defer(worker, "w", "mailbox busy")
            if job.queue_id != stored.queue_id:
                break  # the DSN arrived: the original expired
            await worker.send(Heartbeat("w", 5, [job.job_id]))
        dsn = email.message_from_bytes(job.body, policy=email.policy.default)
        assert isinstance(dsn, EmailMessage)
        assert job.sender == "" and job.recipients == ["s@sender.test"]
        fields = status_blocks(list(dsn.iter_parts())[1])[1]
        assert fields["Action"] == "failed" and fields["Status"] == "4.4.7"
        assert "mailbox busy" in fields["Diagnostic-Code"]
        assert stored.queue_id not in running.shard.scheduler.messages
    finally:
        await running.close()


async def test_bounce_goes_to_the_shard_owning_the_sender(tmp_path: Path) -> None:
    config = shard_config(tmp_path / "spool", shards=2)
    here, there = await RunningShard(config, 0).start(), await RunningShard(config, 1).start()
    try:
        sender_domain = domain_of_shard(1, config.queue.shards, "sender")
        rcpt_domain = domain_of_shard(0, config.queue.shards, "rcpt")
        cli, worker = here.client(), here.client()
        await inject(cli, 1, f"alice@{sender_domain}", [f"bob@{rcpt_domain}"], BODY)
        await worker.send(Heartbeat("w", 5, []))
        job = await worker.recv_type(Deliver)
        await worker.send(Result(job.job_id, "w", [Outcome(job.recipients[0], "failed", 550, "5.1.1", "unknown")]))
        # The DSN is injected into shard 1 and then leaves shard 0's outbox.
        dsn = await until(lambda: next(iter(there.shard.scheduler.messages.values()), None), what="the DSN on shard 1")
        assert dsn.sender == "" and [r.address for r in dsn.recipients] == [f"alice@{sender_domain}"]
        await until(lambda: not here.shard.core.outbox and not here.shard.scheduler.messages,
                    what="shard 0 to forget the original and the outbox entry")
        remote_worker = there.client()
        await remote_worker.send(Heartbeat("w", 5, []))
        delivered = await remote_worker.recv_type(Deliver)
        assert b"Final-Recipient: rfc822; bob@" in delivered.body
    finally:
        await here.close()
        await there.close()


async def test_outbox_survives_until_the_owner_is_up(tmp_path: Path) -> None:
    config = shard_config(tmp_path / "spool", shards=2)
    here = await RunningShard(config, 0).start()
    sender_domain = domain_of_shard(1, config.queue.shards, "sender")
    try:
        cli, worker = here.client(), here.client()
        await inject(cli, 1, f"alice@{sender_domain}", ["bob@" + domain_of_shard(0, config.queue.shards, "r")],
                     BODY)
        await worker.send(Heartbeat("w", 5, []))
        job = await worker.recv_type(Deliver)
        await worker.send(Result(job.job_id, "w", [Outcome(job.recipients[0], "failed", 550, "5.1.1", "unknown")]))
        await until(lambda: here.shard.core.outbox, what="the DSN in the outbox")
    finally:
        await here.close()
    # Restart shard 0 (the outbox is durable) and only now start its owner.
    here = await RunningShard(config, 0).start()
    there = await RunningShard(config, 1).start()
    try:
        assert len(here.shard.core.outbox) == 1
        await until(lambda: len(there.shard.scheduler.messages) == 1, timeout=20, what="the DSN on shard 1")
        await until(lambda: not here.shard.core.outbox, what="the outbox emptied")
    finally:
        await here.close()
        await there.close()


async def test_one_delay_warning_per_message(tmp_path: Path) -> None:
    running = await RunningShard(shard_config(tmp_path / "spool", retry_first=0.5, retry_max=0.5,
                                              delay_warning=0.5)).start()
    try:
        cli, worker = running.client(), running.client()
        stored = await inject(cli, 1, "s@sender.test", ["r@slow.test"], BODY)
        await worker.send(Heartbeat("w", 5, []))
        seen_dsn = 0
        for _ in range(6):
            job = await worker.recv_type(Deliver)
            if job.sender == "":
                seen_dsn += 1
                assert b"Action: delayed" in job.body and b"Will-Retry-Until:" in job.body
                await worker.send(Result(job.job_id, "w", [Outcome(job.recipients[0], "delivered", 250, "2.0.0",
                                                                   "ok")]))
            else:
                await worker.send(Result(job.job_id, "w", [Outcome(r, "deferred", 450, "4.2.0", "busy")
                                                           for r in job.recipients]))
            await worker.send(Heartbeat("w", 5, []))
        assert seen_dsn == 1
        assert running.shard.scheduler.messages[stored.queue_id].warned
    finally:
        await running.close()


async def test_destination_backoff_holds_other_messages(tmp_path: Path) -> None:
    running = await RunningShard(shard_config(tmp_path / "spool", retry_first=30, retry_max=30)).start()
    try:
        cli, worker = running.client(), running.client()
        for req in range(5):
            await inject(cli, req, "s@sender.test", [f"r{req}@down.test"], BODY)
        await worker.send(Heartbeat("w", 1, []))  # one at a time
        for _ in range(3):
            await defer(worker, "w")
        scheduler = running.shard.scheduler
        await until(lambda: "down.test" in scheduler.backoff_until, what="the backoff")
        assert scheduler.recipient_counts[State.READY] == 2  # the others wait instead of being tried
        assert not scheduler.jobs
    finally:
        await running.close()
