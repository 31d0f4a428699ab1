"""Outcome mapping (2xx delivered, 4xx deferred, 5xx failed), error transports and metrics of an attempt."""

from __future__ import annotations

from prometheus_client import REGISTRY

from cluster.bus.schemas import Deliver
from cluster.config import config_from_dict
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.deliver import Deliverer, as_deferral, outcome_from_reply
from cluster.delivery.metrics import status_class
from cluster.delivery.mx import StaticMxResolver
from cluster.smtp.replies import Reply


def test_reply_classes_map_to_statuses() -> None:
    assert outcome_from_reply("a@b", Reply.of(250, "2.0.0", "ok"), "mx[1.2.3.4]").kind == "delivered"
    deferred = outcome_from_reply("a@b", Reply.of(451, "", "try", "later"), "mx[1.2.3.4]")
    assert (deferred.kind, deferred.enhanced, deferred.text, deferred.remote) == (
        "deferred", "4.0.0", "try later", "mx[1.2.3.4]")
    assert outcome_from_reply("a@b", Reply.of(550, "5.1.1", "no"), "").kind == "failed"


def test_unusable_host_refusal_is_reported_as_deferral() -> None:
    assert as_deferral(Reply.of(554, "5.7.1", "go away")) == Reply.of(451, "4.7.1", "go away")
    assert as_deferral(Reply.of(421, "4.3.2", "busy")) == Reply.of(421, "4.3.2", "busy")


def test_status_class() -> None:
    assert status_class("5.1.10", 556) == "5.1"
    assert status_class("", 250) == "2.0"


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def error_transports() -> Deliverer:
    """A deliverer whose transports fail top.test permanently and rare.test temporarily; top.test is a labelled
    domain of the metrics, rare.test counts as "other"."""
    config = config_from_dict({"delivery": {"transports": {"top.test": "error:5.7.1 Not here",
                                                           "rare.test": "error:4.2.1 Later"}},
                               "metrics": {"top_domains": ["top.test"]}}, environ={})
    return Deliverer(config, StaticMxResolver({}), ConnectionCache(30, 100))


async def test_error_transport_and_domain_labels() -> None:
    deliverer = error_transports()
    before_top = sample("mtacluster_delivery_attempts_total", {"outcome": "failed", "domain": "top.test"})
    before_other = sample("mtacluster_delivery_attempts_total", {"outcome": "deferred", "domain": "other"})
    before_class = sample("mtacluster_delivery_status_total", {"status_class": "5.7"})
    job = Deliver(job_id="j", queue_id="q", sender="s@o.test", recipients=["a@top.test", "b@rare.test"],
                  domain="top.test", body=b"x\r\n", attempt=1)
    failed, deferred = await deliverer.deliver(job)
    assert (failed.kind, failed.code, failed.enhanced, failed.text) == ("failed", 550, "5.7.1", "Not here")
    assert (deferred.kind, deferred.code, deferred.enhanced) == ("deferred", 450, "4.2.1")
    assert sample("mtacluster_delivery_attempts_total", {"outcome": "failed", "domain": "top.test"}) == before_top + 1
    assert sample("mtacluster_delivery_attempts_total", {"outcome": "deferred", "domain": "other"}) == before_other + 1
    assert sample("mtacluster_delivery_status_total", {"status_class": "5.7"}) == before_class + 1


async def test_recipients_with_the_same_result_are_counted_each() -> None:
    """Attempts are counted per recipient, also when identical ones are added up in one increment."""
    deliverer = error_transports()
    before_top = sample("mtacluster_delivery_attempts_total", {"outcome": "failed", "domain": "top.test"})
    before_other = sample("mtacluster_delivery_attempts_total", {"outcome": "deferred", "domain": "other"})
    before_class = sample("mtacluster_delivery_status_total", {"status_class": "4.2"})
    recipients = ["a@top.test", "b@rare.test", "c@top.test", "d@TOP.test", "e@rare.test"]
    job = Deliver(job_id="j", queue_id="q", sender="s@o.test", recipients=recipients, domain="top.test",
                  body=b"x\r\n", attempt=1)
    outcomes = await deliverer.deliver(job)
    assert [o.recipient for o in outcomes] == recipients
    assert sample("mtacluster_delivery_attempts_total", {"outcome": "failed", "domain": "top.test"}) == before_top + 3
    assert sample("mtacluster_delivery_attempts_total", {"outcome": "deferred", "domain": "other"}) == before_other + 2
    assert sample("mtacluster_delivery_status_total", {"status_class": "4.2"}) == before_class + 2
