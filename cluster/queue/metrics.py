"""Prometheus metrics of a queue shard (names follow ARCHITECTURE.md, "Metric names"); every metric has label shard="N".

Gauges are set from counters the scheduler keeps up to date on every state change, so refreshing them costs
no scan of the queue.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Gauge("mtacluster_queue_messages", "Queued messages by state (a message's most active recipient state)",
                 ["shard", "state"])
RECIPIENTS = Gauge("mtacluster_queue_recipients", "Queued recipients by state", ["shard", "state"])
OLDEST_AGE = Gauge("mtacluster_queue_oldest_message_age_seconds", "Age of the oldest queued message", ["shard"])
HELD_OFF_DESTINATIONS = Gauge("mtacluster_queue_destinations_held_off",
                              "Destinations held off as a whole after repeated connection-level deferrals",
                              ["shard"])
HELD_OFF_MESSAGES = Gauge("mtacluster_queue_held_off_messages",
                          "Messages with ready recipients waiting behind a held-off destination", ["shard"])
STORED = Counter("mtacluster_queue_messages_stored_total", "Messages stored in the spool", ["shard"])
COMPLETED = Counter("mtacluster_queue_recipients_completed_total",
                    "Recipients finished, by outcome (delivered, failed, expired, deleted)", ["shard", "outcome"])
COMMIT_DURATION = Histogram("mtacluster_queue_spool_commit_duration_seconds",
                            "Duration of one spool transaction including fsync", ["shard"],
                            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
COMMIT_BATCH = Histogram("mtacluster_queue_spool_commit_batch_messages", "New messages stored per spool transaction",
                         ["shard"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
DISK_FREE = Gauge("mtacluster_queue_disk_free_bytes", "Free bytes on the spool's file system", ["shard"])
WORKERS = Gauge("mtacluster_queue_workers_connected", "Workers heard from within queue.worker_timeout", ["shard"])
LEASES_EXPIRED = Counter("mtacluster_queue_leases_expired_total",
                         "Jobs taken back from a vanished or stuck worker", ["shard"])
POSSIBLE_DUPLICATES = Counter("mtacluster_queue_possible_duplicates_total",
                              "Recipients handed out again while an earlier delivery of them may have happened "
                              "(in flight at a crash, or taken back from a silent worker)", ["shard"])
BOUNCES = Counter("mtacluster_queue_bounces_generated_total", "Delivery status notifications generated",
                  ["shard", "kind"])
OUTCOMES = Counter("mtacluster_queue_outcomes_total",
                   "Recipient outcomes the shard recorded and logged, by status as in the log line (sent, deferred, "
                   "bounced, expired; deleted, held, released, flushed by an admin)", ["shard", "status"])
INJECTS_REFUSED = Counter("mtacluster_queue_injects_refused_total", "Injects refused, by reason",
                          ["shard", "reason"])

GAUGE_STATES = ("ready", "deferred", "held", "in_flight")


def initialise(shard: str) -> None:
    """Create every labelled series at zero, so dashboards and alerts see them before the first event."""
    for metric in (STORED, LEASES_EXPIRED, POSSIBLE_DUPLICATES, HELD_OFF_DESTINATIONS, HELD_OFF_MESSAGES):
        metric.labels(shard)
    for outcome in ("delivered", "failed", "expired", "deleted"):
        COMPLETED.labels(shard, outcome)
    for status in ("sent", "deferred", "bounced", "expired", "deleted", "held", "released", "flushed"):
        OUTCOMES.labels(shard, status)
    for kind in ("failed", "delayed"):
        BOUNCES.labels(shard, kind)
    for reason in ("disk_full", "spool_error"):
        INJECTS_REFUSED.labels(shard, reason)
    SUPPRESSED.labels(shard)
    SUPPRESSION_SIZE.labels(shard)
# Traffic shaping holds per (source, destination) (shaping.py): `destination` is the bucket (a domain of
# metrics.top_domains, else "other"; or an "mx:" rollup), `source` the egress source (a configured
# [egress.sources] name) whose counters held the mail back, "" for mail without a pool (the worker's default
# address) and for a suspension of the whole destination. Both label sets are bounded by configuration.
SHAPING_DELAYS = Counter("mtacluster_shaping_delays", "Times a destination's mail was held back by a rate limit or "
                         "a suspension (traffic shaping), by destination and egress source.",
                         ["destination", "source"])
SHAPING_SUSPENSIONS = Counter("mtacluster_shaping_suspensions", "Suspensions of a destination by a reaction rule "
                              "(a reply matching [shaping] rules), by destination and egress source.",
                              ["destination", "source"])
SUPPRESSED = Counter("mtacluster_suppression_recipients", "Recipients failed at once because they are on the "
                     "suppression list, by shard.", ["shard"])
SUPPRESSION_ADDED = Counter("mtacluster_suppression_added", "Addresses put on the suppression list after a hard "
                            "bounce, by bounce category.", ["category"])
SUPPRESSION_SIZE = Gauge("mtacluster_suppression_list_size", "Addresses on the suppression list now, by shard.",
                         ["shard"])


# Draining a shard (drain.py) and the outbox's transfers (outbox.py).
TRANSFERS = Counter("mtacluster_queue_transfers_total",
                    "Messages handed between shards with their state, by outcome (sent: the owner stored one this "
                    "shard sent; received: stored here; duplicate: a resend answered without storing; refused)",
                    ["shard", "outcome"])
DRAIN_STATE = Gauge("mtacluster_queue_drain_state", "1 for the shard's drain state (serving, draining, drained)",
                    ["shard", "state"])
DRAIN_REMAINING = Gauge("mtacluster_queue_drain_remaining_messages",
                        "Messages a shard that is not serving still has to hand over (queue and outbox)", ["shard"])
DRAIN_MOVED = Counter("mtacluster_queue_drain_moved_messages_total",
                      "Messages a draining shard put in its outbox for their new owners", ["shard"])
TRANSFER_JOURNAL = Gauge("mtacluster_queue_transfer_journal_entries",
                         "Keys of received transfers remembered to answer a resend without storing it (journal.py)",
                         ["shard"])
HANDED_OVER = Counter("mtacluster_queue_drain_handed_over_entries_total",
                      "Owned state entries a draining shard handed to their new owners (handover.py), by kind "
                      "(suppression, usage)", ["shard", "kind"])


def initialise_drain(shard: str) -> None:
    for outcome in ("sent", "received", "duplicate", "refused"):
        TRANSFERS.labels(shard, outcome)
    for state in ("serving", "draining", "drained"):
        DRAIN_STATE.labels(shard, state)
    DRAIN_REMAINING.labels(shard)
    DRAIN_MOVED.labels(shard)
    for kind in ("suppression", "usage"):
        HANDED_OVER.labels(shard, kind)
    TRANSFER_JOURNAL.labels(shard)

# Per-user daily limits and AUTH failure counts kept by this shard (cluster.queue.accounts).
USER_LIMIT_REFUSALS = Counter("mtacluster_queue_user_limit_refusals_total",
                              "Requests refused by a per-user daily limit, by user and limit (messages, recipients)",
                              ["shard", "user", "limit"])
USAGE_ENTRIES = Gauge("mtacluster_queue_usage_entries", "Messages counted in the users' current 24-hour windows",
                      ["shard"])
AUTH_CLIENTS_BLOCKED = Counter("mtacluster_queue_auth_clients_blocked_total",
                               "Client addresses that reached auth.max_failures_per_client", ["shard"])


# The children moved per message or per transaction, looked up once per label set (prometheus_client's `labels()`
# costs more than the increment); the label values are bounded (shard, event and outcome names).
@functools.cache
def commit_children(shard: str) -> tuple[Histogram, Histogram]:
    return COMMIT_DURATION.labels(shard), COMMIT_BATCH.labels(shard)


@functools.cache
def outcome_children(shard: str, event: str, completed: str | None) -> tuple[Counter, Counter | None]:
    return OUTCOMES.labels(shard, event), COMPLETED.labels(shard, completed) if completed is not None else None
