"""What a worker answers for jobs it cannot deliver normally: invalid addresses fail at once (553), and a bug
in delivery defers a few attempts, then fails, with one log line per attempt and one traceback in all."""

from __future__ import annotations

import logging

import pytest

from cluster.bus.schemas import Deliver, Outcome
from cluster.config import config_from_dict
from cluster.delivery.mx import StaticMxResolver
from cluster.delivery.worker import INTERNAL_ERROR_ATTEMPTS, Worker


def job(sender: str, recipients: list[str], attempt: int = 1) -> Deliver:
    return Deliver(job_id="j1", queue_id="Q1", sender=sender, recipients=recipients, domain="d.test", body=b"x",
                   attempt=attempt)


class FakeDeliverer:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.jobs: list[Deliver] = []

    async def deliver(self, job: Deliver) -> list[Outcome]:
        self.jobs.append(job)
        if self.error is not None:
            raise self.error
        return [Outcome(r, "delivered", 250, "2.0.0", "ok", "mx.d.test[192.0.2.1]") for r in job.recipients]


def worker_with(deliverer: FakeDeliverer) -> Worker:
    config = config_from_dict({"metrics": {"listen": ""}}, environ={})
    worker = Worker(config, name="w", resolver=StaticMxResolver({}))
    worker.deliverer = deliverer  # type: ignore[assignment]
    return worker


async def test_poison_sender_fails_every_recipient_without_trying(caplog: pytest.LogCaptureFixture) -> None:
    deliverer = FakeDeliverer()
    with caplog.at_level(logging.WARNING):
        outcomes = await worker_with(deliverer)._outcomes(job("\x00@\x00", ["a@d.test", "b@d.test"]))
    assert [(o.recipient, o.kind, o.code, o.enhanced) for o in outcomes] == [
        ("a@d.test", "failed", 553, "5.1.7"), ("b@d.test", "failed", 553, "5.1.7")]
    assert "invalid sender" in outcomes[0].text and deliverer.jobs == []
    assert len(caplog.records) == 1 and "queue_id=Q1" in caplog.text and "Traceback" not in caplog.text


async def test_a_bad_recipient_fails_alone_and_the_others_are_delivered() -> None:
    deliverer = FakeDeliverer()
    outcomes = await worker_with(deliverer)._outcomes(job("s@a.test", ["a@d.test", "b\x00@d.test"]))
    assert {o.recipient: (o.kind, o.code, o.enhanced) for o in outcomes} == {
        "a@d.test": ("delivered", 250, "2.0.0"), "b\x00@d.test": ("failed", 553, "5.1.3")}
    assert [j.recipients for j in deliverer.jobs] == [["a@d.test"]]


async def test_a_bug_defers_then_fails_with_one_traceback(caplog: pytest.LogCaptureFixture) -> None:
    worker = worker_with(FakeDeliverer(RuntimeError("boom")))
    statuses = []
    with caplog.at_level(logging.ERROR):
        for attempt in range(1, INTERNAL_ERROR_ATTEMPTS + 1):
            outcomes = await worker._outcomes(job("s@a.test", ["a@d.test"], attempt))
            statuses.append((outcomes[0].kind, outcomes[0].code, outcomes[0].enhanced))
    assert statuses == [("deferred", 451, "4.3.0")] * (INTERNAL_ERROR_ATTEMPTS - 1) + [("failed", 554, "5.3.0")]
    assert len(caplog.records) == INTERNAL_ERROR_ATTEMPTS
    assert all("queue_id=Q1" in r.getMessage() and "RuntimeError('boom')" in r.getMessage() for r in caplog.records)
    assert [bool(r.exc_info) for r in caplog.records] == [False] * (INTERNAL_ERROR_ATTEMPTS - 1) + [True]
