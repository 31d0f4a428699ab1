"""Prometheus metrics of the delivery worker (names: mtacluster_delivery_*; rules in ARCHITECTURE.md)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

# Imported before the series below are made: its `count` collector is registered ahead of them.
from cluster.observability import count, domain_label

__all__ = ["attempt_counted", "count", "domain_label", "status_class"]

ATTEMPTS = Counter("mtacluster_delivery_attempts", "Delivery attempts per recipient, by outcome and domain.",
                   ["outcome", "domain"])
STATUS = Counter("mtacluster_delivery_status", "Per-recipient results by enhanced status class (e.g. 4.4).",
                 ["status_class"])
DURATION = Histogram("mtacluster_delivery_duration_seconds", "Time from a job received to its result sent.",
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
DNS_LOOKUPS = Counter("mtacluster_delivery_dns_lookups", "MX resolutions, by result.", ["result"])
CONNECTION_CACHE = Counter("mtacluster_delivery_connection_cache", "Connection cache lookups (hit or miss).",
                           ["result"])
CONNECTIONS_OPEN = Gauge("mtacluster_delivery_connections_open", "Outbound SMTP connections open now.")
JOBS_IN_FLIGHT = Gauge("mtacluster_delivery_jobs_in_flight", "Jobs this worker is delivering now.")
SHARDS_CONNECTED = Gauge("mtacluster_delivery_shards_connected", "Queue shards that acknowledged a heartbeat recently.")


def status_class(enhanced: str, code: int) -> str:
    """First two parts of an enhanced status code ("4.4"); from the basic code when there is none ("4.0")."""
    parts = enhanced.split(".")
    if len(parts) == 3 and all(part.isdigit() for part in parts):
        return f"{parts[0]}.{parts[1]}"
    return f"{code // 100}.0"
LMTP = Counter("mtacluster_delivery_lmtp", "Recipients handed to mailbox nodes over LMTP (the local transport), by "
               "outcome: delivered, deferred (the node answered 4xx, e.g. over quota), failed (5xx), "
               "node_unavailable (refused, timed out, TLS failure or died before answering).", ["outcome"])
LMTP_OUTCOMES = ("delivered", "deferred", "failed", "node_unavailable")
# result: fetched | fetch_error (policy fetches); enforced (an attempt under an enforce policy) | refused (enforce
# policy not met: deferred 4.7.5) | testing_violation (a testing policy not met: delivered anyway, logged).
MTA_STS = Counter("mtacluster_delivery_mta_sts", "MTA-STS (RFC 8461) policy fetches and decisions, by result.",
                  ["result"])
MTA_STS_RESULTS = ("fetched", "fetch_error", "enforced", "refused", "testing_violation")


@functools.lru_cache(maxsize=4096)
def _attempt_children(outcome: str, domain: str, status: str) -> tuple[Counter, Counter]:
    return ATTEMPTS.labels(outcome=outcome, domain=domain), STATUS.labels(status_class=status)


@functools.lru_cache(maxsize=4096)
def attempt_children_for(outcome: str, recipient_domain: str, top_domains: frozenset[str], enhanced: str,
                         code: int) -> tuple[Counter, Counter]:
    """The ATTEMPTS and STATUS children for an attempt, from its raw facts (the domain label and the status
    class worked out once per distinct set: the usual outcomes repeat)."""
    return _attempt_children(outcome, domain_label(recipient_domain, top_domains), status_class(enhanced, code))


def attempt_counted(outcome: str, recipient_domain: str, top_domains: frozenset[str], enhanced: str, code: int,
                    recipients: int = 1) -> None:
    """Count `recipients` recipients' attempts with the same outcome, recipient domain and status in ATTEMPTS
    and STATUS. The label children are looked up once per label set (prometheus_client's `labels()` costs more
    than the increment); the label values are bounded (outcome kinds, top domains + "other", status classes),
    so is the cache. The counts go to the series when the registry is read (`count`: no lock per job)."""
    by_outcome, by_status = attempt_children_for(outcome, recipient_domain, top_domains, enhanced, code)
    count(by_outcome, recipients)  # added to the series when they are read (cluster/observability.py)
    count(by_status, recipients)


CACHE_HIT = CONNECTION_CACHE.labels(result="hit")
CACHE_MISS = CONNECTION_CACHE.labels(result="miss")
