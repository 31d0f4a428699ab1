"""Prometheus metrics of the SMTP frontend (names: mtacluster_smtp_* and mtacluster_frontend_*).

The per-message counters are reached through the small accessors at the end (`command_counter`,
`reply_counter`, `rejections`, `accepted`, `connections`, `inject_duration`): each keeps the labelled child it
made, because `labels()` costs more than the increment itself and runs several times per message.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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


# Children already made, by label values (a labelled child lives as long as its metric; none is ever removed).
_commands: dict[str, Counter] = {}
_replies: dict[int, Counter] = {}
_rejections: dict[tuple[str, str], Counter] = {}
_accepted: dict[str, tuple[Counter, Counter]] = {}
_connections: dict[str, Counter] = {}
_inject_durations: dict[int, Histogram] = {}


def command_counter(verb: str) -> Counter:
    """COMMANDS for a verb; a verb outside COMMAND_NAMES counts as "other"."""
    if verb not in COMMAND_NAMES:
        verb = "other"  # keyed by label value: a client's made-up verbs add nothing here
    child = _commands.get(verb)
    if child is None:
        child = _commands[verb] = COMMANDS.labels(command=verb)
    return child


def reply_counter(code: int) -> Counter:
    """REPLIES for the class of a reply code (2xx, 3xx, 4xx, 5xx)."""
    child = _replies.get(code)
    if child is None:
        child = _replies[code] = REPLIES.labels(**{"class": f"{code // 100}xx"})
    return child


def rejections(reason: str, listener: str) -> Counter:
    child = _rejections.get((reason, listener))
    if child is None:
        child = _rejections[(reason, listener)] = MESSAGES_REJECTED.labels(reason=reason, listener=listener)
    return child


def accepted(listener: str) -> tuple[Counter, Counter]:
    """MESSAGES_ACCEPTED and RECEIVED_BYTES of a listener."""
    children = _accepted.get(listener)
    if children is None:
        children = _accepted[listener] = (MESSAGES_ACCEPTED.labels(listener=listener),
                                          RECEIVED_BYTES.labels(listener=listener))
    return children


def connections(listener: str) -> Counter:
    child = _connections.get(listener)
    if child is None:
        child = _connections[listener] = CONNECTIONS.labels(listener=listener)
    return child


def inject_duration(shard: int) -> Histogram:
    child = _inject_durations.get(shard)
    if child is None:
        child = _inject_durations[shard] = INJECT_DURATION.labels(shard=str(shard))
    return child
