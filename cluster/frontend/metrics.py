"""Prometheus metrics of the SMTP frontend (names: mtacluster_smtp_* and mtacluster_frontend_*).

The per-message counters are reached through the small accessors at the end (`command_counter`,
`reply_counter`, `rejections`, `accepted`, `connections`, `inject_duration`): each keeps the labelled child it
made, because `labels()` costs more than the increment itself and runs several times per message.

`count(series, amount)` (cluster/observability.py) adds to a counter (or gauge) series without touching it,
and `count_command` and `count_reply` count a command verb or a reply code in `TALLIES`: the amounts are kept
as plain numbers and added to the series when the registry is read (a scrape of /metrics, or
`REGISTRY.get_sample_value`), by the collector that `cluster.observability` registers ahead of every series
here. A locked Prometheus increment costs more than the rest of handling a command, and a message makes about
a dozen of them (connection, commands, replies, acceptance); a read always sees every count made before it.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

# Imported before the series below are made: its collector is registered ahead of them.
from cluster.observability import count, on_collect

__all__ = ["count", "count_command", "count_reply"]


class _Tallies:
    """Commands by verb and replies by code, as every session counts them (`count_command`, `count_reply`)."""

    def __init__(self) -> None:
        self.commands: dict[str, int] = {}
        self.replies: dict[int, int] = {}

    def flush(self) -> None:
        commands, self.commands = self.commands, {}
        replies, self.replies = self.replies, {}
        for verb, number in commands.items():
            command_counter(verb).inc(number)
        for code, number in replies.items():
            reply_counter(code).inc(number)


TALLIES = _Tallies()
on_collect(TALLIES.flush)


def count_command(verb: str) -> None:
    """One more COMMANDS for `verb` (as `command_counter`: a verb outside COMMAND_NAMES counts as "other"),
    kept as a plain number per verb until the registry is read: the cheapest count there is, made for every
    command of every session."""
    commands = TALLIES.commands
    commands[verb] = commands.get(verb, 0) + 1


def count_reply(code: int) -> None:
    """One more REPLIES for the class of reply `code`, kept as `count_command` keeps commands."""
    replies = TALLIES.replies
    replies[code] = replies.get(code, 0) + 1

CONNECTIONS_CURRENT = Gauge("mtacluster_smtp_connections_current", "SMTP connections open now.")
# `listener` is the listener kind: smtp (smtp.listen), submission or submissions.
CONNECTIONS = Counter("mtacluster_smtp_connections", "SMTP connections accepted, by listener.", ["listener"])
CONNECTIONS_REFUSED = Counter("mtacluster_smtp_connections_refused", "SMTP connections refused, by reason.",
                              ["reason"])
COMMANDS = Counter("mtacluster_smtp_commands", "SMTP commands received, by verb.", ["command"])
REPLIES = Counter("mtacluster_smtp_replies", "SMTP replies sent, by class.", ["class"])
MESSAGES_ACCEPTED = Counter("mtacluster_smtp_messages_accepted", "Messages answered with 250 after DATA, by listener.",
                            ["listener"])
MESSAGES_REJECTED = Counter("mtacluster_smtp_messages_rejected",
                            "Messages or recipients refused, by reason and listener.", ["reason", "listener"])
RECEIVED_BYTES = Counter("mtacluster_smtp_received_bytes", "Message bytes received (after DATA), by listener.",
                         ["listener"])
ACCEPT_LATENCY = Histogram("mtacluster_smtp_accept_latency_seconds",
                           "Time from the end of DATA to the 250 reply (includes the spool fsync).",
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
INJECT_DURATION = Histogram("mtacluster_frontend_inject_duration_seconds",
                            "Round trip of one Inject to a shard until Stored.", ["shard"],
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
AUTH = Counter("mtacluster_smtp_auth", "SMTP AUTH exchanges that ended, by result (success|failure).", ["result"])
TLS_HANDSHAKES = Counter("mtacluster_smtp_tls_handshakes",
                         "STARTTLS handshakes, by result (success|failure).", ["result"])
SHARDS_REACHABLE = Gauge("mtacluster_frontend_shards_reachable", "Queue shards that answered recently.")

COMMAND_NAMES = frozenset(
    {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP", "VRFY", "STARTTLS", "AUTH"}
)


# Each accessor makes its labelled child once per label values and keeps it (functools.cache, as
# cluster/delivery/metrics.py does); a child lives as long as its metric and none is ever removed, and every
# label here takes a bounded set of values (verbs outside COMMAND_NAMES count as "other").


def command_counter(verb: str) -> Counter:
    """COMMANDS for a verb; a verb outside COMMAND_NAMES counts as "other"."""
    return _command(verb if verb in COMMAND_NAMES else "other")


@functools.cache
def _command(verb: str) -> Counter:
    return COMMANDS.labels(command=verb)


@functools.cache
def reply_counter(code: int) -> Counter:
    """REPLIES for the class of a reply code (2xx, 3xx, 4xx, 5xx)."""
    return REPLIES.labels(**{"class": f"{code // 100}xx"})


@functools.cache
def rejections(reason: str, listener: str) -> Counter:
    return MESSAGES_REJECTED.labels(reason=reason, listener=listener)


@functools.cache
def accepted(listener: str) -> tuple[Counter, Counter]:
    """MESSAGES_ACCEPTED and RECEIVED_BYTES of a listener."""
    return MESSAGES_ACCEPTED.labels(listener=listener), RECEIVED_BYTES.labels(listener=listener)


@functools.cache
def connections(listener: str) -> Counter:
    return CONNECTIONS.labels(listener=listener)


@functools.cache
def inject_duration(shard: int) -> Histogram:
    return INJECT_DURATION.labels(shard=str(shard))
