"""Bounces and delay warnings of one shard (cluster/queue/bounces.py) without a spool or sockets.

`BounceMaker.build` is checked field by field (the DSN's envelope and spool record, and what its body says),
`stored` for where a DSN goes, and the delay-warning clock (`track`, `check_delays`, the warning's commit and
its retry after a spool error) with stubs that record what the maker asked for.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
from collections.abc import Coroutine
from email.message import EmailMessage
from typing import Any

import pytest
from prometheus_client import REGISTRY

from cluster.bus.ring import shard_for_address
from cluster.bus.schemas import OutcomeKind
from cluster.config import Config, config_from_dict
from cluster.queue.bounces import DELAY_RECHECK, BounceMaker
from cluster.queue.records import LastOutcome, Message, QueueIdFactory, Recipient, State
from cluster.queue.spool import Batch, SpoolError
from tests.support.dsn import status_blocks

NOW = 1_700_000_000.0
ARRIVAL = NOW - 3600
SHARDS = ["tcp://127.0.0.1:5570", "tcp://127.0.0.1:5571"]
HEADERS = b"From: Alice <alice@sender.test>\r\nSubject: Hello\r\nMessage-ID: <m1@sender.test>\r\n\r\n"


def make_config(**queue: Any) -> Config:
    return config_from_dict({"smtp": {"hostname": "mta.test"},
                             "queue": {"shards": SHARDS, "max_lifetime": 86400, **queue}}, environ={})


def sender_on_shard(index: int) -> str:
    return next(f"alice@d{i}.test" for i in range(200) if shard_for_address(f"alice@d{i}.test", SHARDS) == index)


class FakeIO:
    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.fail = False

    async def read_headers(self, queue_id: str) -> bytes | None:
        return HEADERS

    async def commit(self, batch: Batch) -> None:
        if self.fail:
            raise SpoolError("disk full")
        self.batches.append(batch)


class FakeOutbox:
    def __init__(self) -> None:
        self.added: list[Message] = []

    def add(self, message: Message) -> None:
        self.added.append(message)


class Maker:
    """A BounceMaker with recording stubs around it."""

    def __init__(self, index: int = 0, **queue: Any) -> None:
        self.io, self.outbox = FakeIO(), FakeOutbox()
        self.messages: dict[str, Message] = {}
        self.local: list[Message] = []
        self.spawned: list[Coroutine[Any, Any, None]] = []
        self.maker = BounceMaker(make_config(**queue), index, QueueIdFactory(index), self.io,  # type: ignore[arg-type]
                                 self.outbox, self.messages.get, self.local.append,  # type: ignore[arg-type]
                                 self.spawned.append)

    def run_spawned(self) -> None:
        spawned, self.spawned[:] = list(self.spawned), []
        for coroutine in spawned:
            asyncio.run(coroutine)


SENDER = sender_on_shard(0)  # so a shard-0 maker keeps its DSNs local


def message(sender: str = SENDER, states: tuple[State, ...] = (State.FAILED,)) -> Message:
    recipients = [Recipient(i, f"user{i}@remote.test", state) for i, state in enumerate(states)]
    return Message("Q0000000000000000", sender, ARRIVAL, recipients, 1234, {"client": "192.0.2.1"})


def failed(index: int = 0, attempts: int = 2) -> Recipient:
    return Recipient(index, f"user{index}@remote.test", State.FAILED, attempts, 0.0,
                     LastOutcome(OutcomeKind.FAILED, 550, "5.1.1", "No such user here", "mx.remote.test[192.0.2.7]"))


def parse(body: bytes) -> tuple[EmailMessage, dict[str, str], list[dict[str, str]]]:
    dsn = email.message_from_bytes(body, policy=email.policy.default)
    assert isinstance(dsn, EmailMessage)
    part = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    blocks = [dict(block.items()) for block in status_blocks(part)]
    return dsn, blocks[0], blocks[1:]


def test_a_failure_dsn_goes_from_the_null_sender_to_the_original_sender() -> None:
    maker = Maker().maker
    original = message()
    dsn, body = maker.build(original, [failed()], HEADERS, NOW, "failed") or pytest.fail("no DSN")
    assert dsn.sender == ""
    assert [(r.index, r.address, r.state) for r in dsn.recipients] == [(0, SENDER, State.READY)]
    assert dsn.arrival == NOW and dsn.size == len(body)
    assert dsn.client == {"dsn": "failed", "original_queue_id": original.queue_id}
    assert len(dsn.queue_id) == 16 and dsn.queue_id != original.queue_id
    assert not dsn.warned

    parsed, per_message, (recipient,) = parse(body)
    assert [a.addr_spec for a in parsed["To"].addresses] == [SENDER]
    assert parsed["From"] == "Mail Delivery System <MAILER-DAEMON@mta.test>"
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed["Date"].datetime.timestamp() == NOW
    assert per_message == {"Reporting-MTA": "dns; mta.test", "X-Queue-ID": original.queue_id,
                           "Arrival-Date": email.utils.formatdate(ARRIVAL, usegmt=True)}
    assert recipient == {"Final-Recipient": "rfc822; user0@remote.test", "Action": "failed", "Status": "5.1.1",
                         "Remote-MTA": "dns; mx.remote.test",
                         "Diagnostic-Code": "smtp; 550 5.1.1 No such user here",
                         "Last-Attempt-Date": email.utils.formatdate(NOW, usegmt=True)}
    original_headers = next(p for p in parsed.walk() if p.get_content_type() == "text/rfc822-headers")
    assert "Message-ID: <m1@sender.test>" in str(original_headers.get_payload())


def test_a_recipient_never_tried_has_no_last_attempt_and_no_remote() -> None:
    maker = Maker().maker
    never_tried = Recipient(0, "user0@remote.test", State.FAILED, 0, 0.0,
                            LastOutcome(OutcomeKind.FAILED, 550, "5.1.10", "null MX"))
    _, body = maker.build(message(), [never_tried], HEADERS, NOW, "failed") or pytest.fail("no DSN")
    _, _, (recipient,) = parse(body)
    assert recipient["Status"] == "5.1.10"
    assert "Last-Attempt-Date" not in recipient and "Remote-MTA" not in recipient
    assert recipient["Diagnostic-Code"] == "X-mtacluster; 550 5.1.10 null MX"


def test_a_delay_warning_says_until_when_the_shard_keeps_trying() -> None:
    maker = Maker().maker
    pending = Recipient(0, "user0@remote.test", State.DEFERRED, 3, 0.0,
                        LastOutcome(OutcomeKind.DEFERRED, 451, "4.4.1", "timed out"))
    dsn, body = maker.build(message(), [pending], HEADERS, NOW, "delayed") or pytest.fail("no DSN")
    parsed, _, (recipient,) = parse(body)
    assert dsn.client["dsn"] == "delayed"
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    assert recipient["Action"] == "delayed" and recipient["Status"] == "4.4.1"
    assert recipient["Will-Retry-Until"] == email.utils.formatdate(ARRIVAL + 86400, usegmt=True)


@pytest.mark.parametrize("index", [0, 1])
def test_the_dsn_is_local_or_forwarded_to_the_shard_owning_the_sender(index: int) -> None:
    maker = Maker(index).maker
    for owner in (0, 1):
        dsn, _ = maker.build(message(sender_on_shard(owner)), [failed()], HEADERS, NOW, "failed") or pytest.fail()
        assert dsn.forward_shard == (-1 if owner == index else owner)


def test_no_dsn_for_a_null_sender_or_for_no_recipients() -> None:
    maker = Maker().maker
    assert maker.build(message(sender=""), [failed()], HEADERS, NOW, "failed") is None
    assert maker.build(message(), [], HEADERS, NOW, "failed") is None


def bounces_counted(shard: str, kind: str) -> float:
    return REGISTRY.get_sample_value("mtacluster_queue_bounces_generated_total", {"shard": shard, "kind": kind}) or 0


def test_a_stored_dsn_is_scheduled_here_or_handed_to_the_outbox_and_counted() -> None:
    harness = Maker(1)
    local, _ = harness.maker.build(message(sender_on_shard(1)), [failed()], HEADERS, NOW, "failed") or pytest.fail()
    remote, _ = harness.maker.build(message(sender_on_shard(0)), [failed()], HEADERS, NOW, "delayed") or pytest.fail()
    before = bounces_counted("1", "failed"), bounces_counted("1", "delayed")
    harness.maker.stored(local)
    harness.maker.stored(remote)
    assert harness.local == [local] and harness.outbox.added == [remote]
    assert (bounces_counted("1", "failed"), bounces_counted("1", "delayed")) == (before[0] + 1, before[1] + 1)


def test_one_delay_warning_when_due_listing_only_pending_recipients() -> None:
    harness = Maker(delay_warning=600)
    waiting = message(states=(State.DEFERRED, State.DELIVERED, State.READY))
    harness.messages[waiting.queue_id] = waiting
    harness.maker.track(waiting)
    harness.maker.check_delays(ARRIVAL + 599.9)
    assert harness.spawned == [] and not waiting.warned
    harness.maker.check_delays(ARRIVAL + 600)
    assert len(harness.spawned) == 1 and waiting.warned
    harness.run_spawned()
    harness.maker.check_delays(ARRIVAL + 10_000)
    assert harness.spawned == []

    (batch,) = harness.io.batches
    assert batch.flags == {waiting.queue_id: (True, -1)}
    (dsn,) = batch.stores
    assert dsn.client == {"dsn": "delayed", "original_queue_id": waiting.queue_id}
    _, _, recipients = parse(batch.bodies[dsn.queue_id])
    assert [r["Final-Recipient"] for r in recipients] == ["rfc822; user0@remote.test", "rfc822; user2@remote.test"]
    assert harness.local == [dsn]


def test_a_delay_warning_that_cannot_be_stored_is_tried_again_later() -> None:
    harness = Maker(delay_warning=600)
    waiting = message(states=(State.DEFERRED,))
    harness.messages[waiting.queue_id] = waiting
    harness.maker.track(waiting)
    harness.io.fail = True
    harness.maker.check_delays(ARRIVAL + 600)
    harness.run_spawned()
    assert not waiting.warned and harness.local == []
    harness.io.fail = False
    harness.maker.check_delays(ARRIVAL + 600 + DELAY_RECHECK - 1)
    assert harness.spawned == []
    harness.maker.check_delays(ARRIVAL + 600 + DELAY_RECHECK)
    harness.run_spawned()
    assert waiting.warned and len(harness.local) == 1


@pytest.mark.parametrize(("delay_warning", "sender", "states", "known"), [
    (0, SENDER, (State.DEFERRED,), True),  # warnings are off
    (600, "", (State.DEFERRED,), True),  # null sender: never a DSN
    (600, SENDER, (State.DELIVERED, State.FAILED), True),  # nothing pending any more
    (600, SENDER, (State.DEFERRED,), False),  # gone from the queue meanwhile
])
def test_no_delay_warning(delay_warning: int, sender: str, states: tuple[State, ...], known: bool) -> None:
    harness = Maker(delay_warning=delay_warning)
    waiting = message(sender=sender, states=states)
    if known:
        harness.messages[waiting.queue_id] = waiting
    harness.maker.track(waiting)
    harness.maker.check_delays(ARRIVAL + 10_000)
    assert harness.spawned == [] and not waiting.warned


def test_a_message_already_warned_is_not_tracked_again() -> None:
    harness = Maker(delay_warning=600)
    waiting = message(states=(State.DEFERRED,))
    waiting.warned = True
    harness.messages[waiting.queue_id] = waiting
    harness.maker.track(waiting)
    waiting.warned = False
    harness.maker.check_delays(ARRIVAL + 10_000)
    assert harness.spawned == []
