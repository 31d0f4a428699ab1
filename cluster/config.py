"""Configuration: one TOML file -> frozen, validated dataclasses.

Every limit and timeout of the cluster has its default here, and only here. `load_config(path)` reads the
file (or uses the built-in defaults when `path` is None), applies environment overrides, checks every value
against its bounds and returns a `Config`. A bad value raises `ConfigError` naming the key and why.

Environment overrides: `MTACLUSTER_<SECTION>_<KEY>=value`, for example `MTACLUSTER_SMTP_HOSTNAME=mx.example`
or `MTACLUSTER_QUEUE_SHARDS='["tcp://10.0.0.5:5570"]'`. The value is read as a TOML value when it parses as
one, else as a plain string.

Durations accept an integer or float number of seconds, or a string with a unit: "90s", "5m", "2h", "5d".
Sizes accept a number of bytes or a string with a unit: "512KiB", "25MiB", "1GiB".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import cpu_limits

ENV_PREFIX = "MTACLUSTER_"


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of bounds."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


class Duration(float):
    """Seconds, written in TOML as a number or as "5m"-style text."""


class Size(int):
    """Bytes, written in TOML as a number or as "25MiB"-style text."""


@dataclass(frozen=True)
class SmtpConfig:
    # The name this MTA gives itself in the greeting, EHLO reply and Received headers.
    hostname: str = "localhost"
    # Addresses the frontends listen on for mail from other MTAs, "host:port" ("[::1]:25" for IPv6).
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    # RFC 6409 message submission for mail clients (port 587 style): STARTTLS offered, MAIL only after AUTH
    # (530 5.7.0), Message-ID and Date added when missing. Needs smtp.tls_cert_file. Empty = not offered.
    submission_listen: tuple[str, ...] = ()
    # RFC 8314 3.3 implicit TLS submission (port 465 style): TLS from the first byte, otherwise as
    # submission_listen. Needs smtp.tls_cert_file. Empty = not offered.
    submissions_listen: tuple[str, ...] = ()
    # Clients in these networks may relay to any domain (CIDR notation).
    relay_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Domains that anyone may send to; mail to them is accepted from any client.
    local_domains: tuple[str, ...] = ()
    # RFC 5321 4.5.3.1.7: at least 64 KiB; 25 MiB matches common practice.
    max_message_size: Size = Size(25 * 1024 * 1024)
    # RFC 5321 4.5.3.1.8: at least 100 recipients per transaction.
    max_recipients: int = 100
    # RFC 5321 4.5.3.1.4 and 4.5.3.1.6: command line 512 octets, text line 1000 octets, both counting CRLF.
    max_command_line: int = 512
    max_text_line: int = 1000
    # Protocol errors tolerated per session before the connection is closed (Postfix smtpd_hard_error_limit).
    max_errors: int = 20
    # Concurrent connections from one client address, per frontend process.
    max_connections_per_client: int = 50
    # Concurrent connections per frontend process.
    max_connections: int = 2000
    # RFC 5321 4.5.3.2.7: server timeout while waiting for a command, 5 minutes.
    command_timeout: Duration = Duration(300)
    # RFC 5321 4.5.3.2.5: 3 minutes between data blocks.
    data_timeout: Duration = Duration(180)
    # How long the frontend waits for every shard's Stored before answering 451 4.3.0.
    inject_timeout: Duration = Duration(60)
    # On SIGTERM a frontend reports not ready (/readyz) at once, then keeps listening and serving its sessions
    # for this long, so a load balancer checking /readyz stops sending it connections and none is refused; only
    # then does it stop listening and answer 421 4.3.2 to the sessions still open. 0 = no grace (one host).
    shutdown_grace: Duration = Duration(0)
    # Expect a PROXY protocol v1/v2 header from the load balancer on every connection.
    proxy_protocol: bool = False
    # RFC 3207 STARTTLS: PEM certificate chain and private key of the frontends (both or neither). When set,
    # EHLO offers STARTTLS, and SMTP AUTH is offered only after it (ARCHITECTURE.md contract 5).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Failed SMTP AUTH exchanges per session before 421 4.7.0 and close (slows down password guessing).
    max_auth_failures: int = 3
    # RFC 3030 CHUNKING: EHLO offers CHUNKING and BDAT is accepted (as Postfix does by default since 3.4).
    chunking: bool = True
    # Clients neither authenticated nor in relay_networks: refuse a MAIL FROM domain with no A, AAAA or MX
    # (550 5.1.8; 450 4.1.8 when DNS fails temporarily; 550 5.7.27 for a null MX, RFC 7505).
    reject_unknown_sender_domain: bool = True
    # SPF (RFC 7208) for those clients: "reject" (fail -> 550 5.7.23), "tag" (only the Received-SPF header)
    # or "off". A temporary DNS error gives 451 4.7.24 under "reject" and "tag".
    spf: str = "reject"


@dataclass(frozen=True)
class QueueConfig:
    # ZeroMQ endpoints of the queue shards; the index in this list is the shard number.
    shards: tuple[str, ...] = ("tcp://127.0.0.1:5570",)
    # Each shard keeps its spool under <spool_dir>/shard-<N>.
    spool_dir: str = "./var/spool"
    # Most messages committed in one spool transaction (group commit).
    commit_batch_max: int = 512
    # A job not finished (nor listed in a worker heartbeat) within this time goes back to ready.
    lease_time: Duration = Duration(600)
    # A worker not heard from within this time is presumed gone and its jobs go back to ready.
    worker_timeout: Duration = Duration(10)
    # Interval of heartbeats between workers and shards.
    heartbeat_interval: Duration = Duration(1)
    # Retry schedule: first retry after retry_first, doubling, capped at retry_max, with jitter.
    retry_first: Duration = Duration(300)
    retry_max: Duration = Duration(4000)
    # Deferred recipients older than this fail with 4.4.7 and bounce.
    max_lifetime: Duration = Duration(5 * 86400)
    # Send one "delayed" DSN after this long in the queue; 0 = never.
    delay_warning: Duration = Duration(0)
    # Refuse new mail (452 4.3.1) when the spool's file system has less free space than this.
    min_free_space: Size = Size(100 * 1024 * 1024)


@dataclass(frozen=True)
class DeliveryConfig:
    # "host:port" to send all outbound mail through; empty = route by MX.
    smarthost: str = ""
    # TCP port used for MX hosts.
    port: int = 25
    # Older name of dns.nameservers (kept so that old files load); set one of them, not both.
    nameservers: tuple[str, ...] = ()
    # Name sent in EHLO; empty = smtp.hostname.
    helo_name: str = ""
    # Concurrent deliveries a worker accepts from each shard (its credits).
    concurrency: int = 100
    # Most connections to one destination domain at once, per shard.
    destination_concurrency: int = 20
    # Most recipients per SMTP transaction (RFC 5321 4.5.3.1.8 allows servers to refuse above 100).
    max_recipients_per_transaction: int = 50
    # Most MX addresses tried in one delivery attempt.
    max_mx_addresses: int = 5
    # Client timeouts, RFC 5321 4.5.3.2.
    connect_timeout: Duration = Duration(30)
    greeting_timeout: Duration = Duration(300)
    helo_timeout: Duration = Duration(300)
    mail_timeout: Duration = Duration(300)
    rcpt_timeout: Duration = Duration(300)
    data_timeout: Duration = Duration(120)
    data_block_timeout: Duration = Duration(180)
    data_done_timeout: Duration = Duration(600)
    # Idle connections are kept for reuse this long.
    connection_idle_timeout: Duration = Duration(30)
    # A cached connection is closed after this many transactions.
    max_deliveries_per_connection: int = 100
    # STARTTLS: "opportunistic" (default, no certificate check), "verify" (required and checked) or "none".
    tls: str = "opportunistic"
    # Routing table: domain or ".parent" -> "smtp:[host]:port", "smtp:host", "local" or "error:5.x.y text".
    # "local" delivers by LMTP to the mailbox node that owns the recipient (see [mailbox]).
    transports: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsConfig:
    # HTTP listener for /metrics, /healthz and /readyz ("" = disabled).
    listen: str = "127.0.0.1:9450"
    # Destination domains that get their own metric label; all others count as "other".
    top_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthConfig:
    # The users file (see cluster/users.py; `mtacluster user add`): who may log in with SMTP AUTH (to relay)
    # and POP3 (to fetch mail). Empty = nobody can log in.
    users_file: str = ""
    # Failed SMTP AUTH attempts from one client address, counted cluster-wide (at the queue shard owning the
    # address), within failure_window; past it every AUTH from that address gets 421 4.7.0 until the window
    # has passed. 0 = no cluster-wide count (smtp.max_auth_failures still ends each session).
    max_failures_per_client: int = 10
    failure_window: Duration = Duration(900)
    # An authenticated MAIL FROM must be one of the user's addresses (553 5.7.1 otherwise).
    sender_login_match: bool = True


@dataclass(frozen=True)
class LimitsConfig:
    # Per authenticated user, over a rolling 24 hours, counted at the queue shard owning the user name
    # (0 = no limit). The users file may override both per user.
    messages_per_day: int = 1000
    recipients_per_day: int = 5000


@dataclass(frozen=True)
class DnsConfig:
    # DNS servers for every role, "host" or "host:port"; empty = the system resolver. `delivery.nameservers`
    # is an older name for the same list.
    nameservers: tuple[str, ...] = ()
    # Seconds one lookup may take (all servers and retries together) before it counts as a temporary failure.
    timeout: Duration = Duration(10)


@dataclass(frozen=True)
class LogConfig:
    # "text": one human-readable line per event; "json": one JSON object per line, with the event's fields
    # (queue_id, to, relay, delays, dsn, status...) for log pipelines such as Loki or Elasticsearch.
    format: str = "text"
    # DEBUG, INFO, WARNING or ERROR (as MTACLUSTER_LOG_LEVEL=DEBUG in the environment, like every key).
    level: str = "INFO"


@dataclass(frozen=True)
class BusConfig:
    # File holding the cluster's CURVE key pair (made by `mtacluster keys`): every process of the cluster
    # encrypts and authenticates bus traffic with it. Required when a shard endpoint is not on loopback.
    curve_key_file: str = ""


@dataclass(frozen=True)
class MailboxConfig:
    # The mailbox role owns the Maildirs: <maildir_root>/<mailbox>/ (new, cur, tmp), where <mailbox> is the
    # lower-cased local part of the recipient or login name.
    maildir_root: str = "./var/maildir"
    # LMTP endpoints ("host:port") of every mailbox node, in node order: a user's Maildir lives on the node that
    # rendezvous hashing of the mailbox name picks (ARCHITECTURE.md contract 7). Workers deliver the `local`
    # transport there; POP3 logins on another node are proxied to it (to the node's host, on the POP3 port
    # that every node uses: the port of pop3_listen[0], or of pop3s_listen[0] without POP3).
    nodes: tuple[str, ...] = ("127.0.0.1:2424",)
    # Where this node accepts LMTP (RFC 2033) from the workers. Not a public port: only workers connect.
    lmtp_listen: tuple[str, ...] = ("127.0.0.1:2424",)
    # POP3 with STLS (RFC 1939, RFC 2595; port 110, 1110 needs no privileges) and POP3S, implicit TLS
    # (RFC 8314; port 995). POP3S needs tls_cert_file / tls_key_file.
    pop3_listen: tuple[str, ...] = ("127.0.0.1:1110",)
    pop3s_listen: tuple[str, ...] = ()
    # PEM certificate chain and private key (both or neither), for STLS, POP3S and STARTTLS on LMTP. Without
    # them, POP3 logins are accepted only from loopback clients (plaintext passwords never cross a network),
    # and every node must be on loopback (LMTP off the host is encrypted: ARCHITECTURE.md contract 5).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # CA certificate (PEM) that workers and mailbox nodes check a node's certificate against, for LMTP and for
    # proxied POP3. Empty: the connection is still encrypted (TLS is required off loopback), but not checked.
    node_ca_file: str = ""
    # Largest Maildir (octets of its messages) per user; 0 = no limit. A user's `mailbox_quota` in the users
    # file overrides it. Over quota: 452 4.2.2 (try later); a message larger than the quota: 552 5.2.2.
    quota: Size = Size(0)
    # Failed logins (USER/PASS) per POP3 session before "-ERR [AUTH]" and close (slows down password guessing).
    max_auth_failures: int = 3
    # Other "-ERR" answers to client mistakes per POP3 session before the connection is closed.
    max_errors: int = 10
    # RFC 1939 3: the autologout timer of an idle POP3 session is at least 10 minutes.
    idle_timeout: Duration = Duration(600)
    # Concurrent POP3 connections per mailbox process; more get "-ERR [SYS/TEMP]" and are closed.
    max_connections: int = 500
    # RFC 5321 4.5.3.2.7 (LMTP is SMTP on this point): an idle LMTP connection is closed after this.
    lmtp_timeout: Duration = Duration(300)


@dataclass(frozen=True)
class UpConfig:
    # Processes started by `mtacluster up`; 0 = scaled to the CPUs this process may use (`up_processes`): one
    # frontend per CPU and one worker per two CPUs, at least one each. A frontend spends about twice a worker's CPU
    # on a message, and on 2 CPUs 2 frontends and 1 worker took less CPU per message and answered sooner than 2 and
    # 2 (ARCHITECTURE.md, "Performance notes").
    frontends: int = 0
    workers: int = 0
    # Also start one mailbox process (after the workers): node 0 of mailbox.nodes.
    mailbox: bool = True
    # Restart a child that exits unexpectedly, after this delay.
    restart_delay: Duration = Duration(1)


def up_processes(up: UpConfig, cpus: int | None = None) -> tuple[int, int]:
    """(frontends, workers) that `mtacluster up` starts: the configured counts, or for 0 the counts scaled to
    `cpus` (default: `cpu_limits.usable_cpus()`), one frontend per CPU and one worker per two CPUs, at least one
    each."""
    if cpus is None and (up.frontends == 0 or up.workers == 0):
        cpus = cpu_limits.usable_cpus()
    frontends = up.frontends or max(1, cpus or 1)
    workers = up.workers or max(1, (cpus or 1) // 2)
    return frontends, workers


# RFC 6376 5.4.1: the header fields a signer should sign ("From" is required, and we oversign it). Message-ID,
# MIME-Version and the Content-* fields are added because changing them changes what the reader sees.
DKIM_DEFAULT_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from", "resent-to", "resent-cc",
    "in-reply-to", "references", "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post",
    "list-subscribe", "list-post", "list-owner", "list-archive", "message-id", "mime-version", "content-type",
    "content-transfer-encoding",
)
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


@dataclass(frozen=True)
class DkimDomain:
    # RFC 6376 3.1: the public key is published as TXT at <selector>._domainkey.<signing domain>.
    selector: str = ""
    # PEM private key (`mtacluster dkim keygen`): RSA for "rsa-sha256", Ed25519 for "ed25519-sha256" (RFC 8463).
    key_file: str = ""
    algorithm: str = "rsa-sha256"
    # The signing domain (d=); empty = the entry's own name. Required for the "*" entry, which signs mail of
    # every From: domain without an entry of its own with the operator's key.
    domain: str = ""


@dataclass(frozen=True)
class DkimConfig:
    # From: domain (or "*") -> its signing key. Mail from authenticated users and relay clients is signed.
    domains: Mapping[str, DkimDomain] = field(default_factory=dict)
    # Header fields signed when present; "from" is always signed, once more than it occurs (oversigned).
    sign_headers: tuple[str, ...] = DKIM_DEFAULT_HEADERS


@dataclass(frozen=True)
class EgressSource:
    # The local IP address outgoing connections are made from ("" = the kernel's choice).
    address: str = ""
    # The name said in EHLO from this address (its PTR name); "" = delivery.helo_name, else smtp.hostname.
    helo_name: str = ""


@dataclass(frozen=True)
class PoolMember:
    # The name of an [egress.sources] entry, and its share of the pool's connections.
    source: str = ""
    weight: int = 1


@dataclass(frozen=True)
class EgressConfig:
    # Name -> a local address and its EHLO name.
    sources: Mapping[str, EgressSource] = field(default_factory=dict)
    # Name -> its sources: ["a", "b"] or [{ source = "a", weight = 3 }, "b"]. A message uses one pool: the pool
    # of its authenticated user, else of its sender's domain, else "default" (if there is one).
    pools: Mapping[str, tuple[PoolMember, ...]] = field(default_factory=dict)
    # Sender domain -> pool, and authenticated user name -> pool.
    sender_domains: Mapping[str, str] = field(default_factory=dict)
    users: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MtaStsConfig:
    # RFC 8461: look up, fetch, cache and apply the MTA-STS policy of each destination reached by MX.
    enabled: bool = True
    # Time for the HTTPS fetch of one policy.
    fetch_timeout: Duration = Duration(10)
    # For tests: a PEM CA file trusted in addition to the system store (policy host and MX certificates), and
    # the port of the policy host (RFC 8461 3.3 says 443).
    ca_file: str = ""
    https_port: int = 443


@dataclass(frozen=True)
class SuppressionConfig:
    # A recipient that hard-bounced (bad mailbox or domain) is suppressed this long: later mail to it fails at
    # once with a DSN, without a delivery attempt. 0 = no suppression.
    ttl: Duration = Duration(0)


@dataclass(frozen=True)
class ShapingReaction:
    # A Python regular expression searched in a deferral or failure reply ("421 4.7.28 text").
    match: str = ""
    # "suspend": no delivery to the destination for `duration`; "rate": `rate` as its max_message_rate meanwhile.
    action: str = "suspend"
    duration: Duration = Duration(3600)
    rate: str = ""
    # With egress pools, shaping counts per (source, destination): "source" applies the reaction to the source
    # the reply came through only, "destination" to every source (the destination as a whole).
    scope: str = "source"


@dataclass(frozen=True)
class ShapingRule:
    # Each key unset (0 / "") inherits from the less specific entries: default < "mx:" rollup < ".parent" < domain.
    connection_limit: int = 0
    max_message_rate: str = ""
    max_connection_rate: str = ""
    max_deliveries_per_connection: int = 0
    max_recipients_per_transaction: int = 0
    rules: tuple[ShapingReaction, ...] = ()


# Shipped per-provider limits (traffic shaping). The figures are the ones KumoMTA ships in its shaping.toml,
# where each provider's entry cites its postmaster pages: Google https://support.google.com/mail/answer/81126,
# Yahoo https://senders.yahooinc.com/best-practices (including the [TS04] suspension for 2 hours), Microsoft
# https://sendersupport.olc.protection.outlook.com/pm/Policies, Apple https://support.apple.com/en-us/102322,
# Comcast https://spa.xfinity.com/postmaster, Orange https://messagerie.orange.fr/postmaster.html. The Gmail
# 421-4.7.28 ("unusual rate of unsolicited mail") reaction is ours: slow to 60/h for an hour, as Google asks.
# A configured [shaping."KEY"] entry overrides these key by key.
SHIPPED_SHAPING: dict[str, dict[str, object]] = {
    "mx:google.com": {"connection_limit": 5, "max_deliveries_per_connection": 50,
                      "rules": [{"match": r"4\.7\.28", "action": "rate", "rate": "60/h", "duration": "1h"}]},
    "mx:googlemail.com": {"connection_limit": 5, "max_deliveries_per_connection": 50},
    "mx:yahoodns.net": {"max_deliveries_per_connection": 20,
                        "rules": [{"match": r"\[TS?S04\]", "action": "suspend", "duration": "2h"}]},
    "mx:olc.protection.outlook.com": {"connection_limit": 5, "max_deliveries_per_connection": 50},
    "mx:mail.protection.outlook.com": {"connection_limit": 5, "max_deliveries_per_connection": 50},
    "mx:icloud.com": {"connection_limit": 10, "max_deliveries_per_connection": 5},
    "comcast.net": {"connection_limit": 25, "max_deliveries_per_connection": 1000},
    "orange.fr": {"connection_limit": 3},
    "mail.com": {"max_deliveries_per_connection": 100},
}
RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "m": 60, "h": 3600, "hr": 3600,
              "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(text: str, key: str) -> tuple[int, float]:
    """"N/unit" (unit s, min, h or d) -> (N, seconds of the period); ConfigError when malformed."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*([a-z]+)\s*", text)
    if not m or m.group(2) not in RATE_UNITS or int(m.group(1)) < 1:
        raise ConfigError(key, f'expected a rate such as "10/s", "100/min", "1000/h" or "5000/d", got {text!r}')
    return int(m.group(1)), float(RATE_UNITS[m.group(2)])


@dataclass(frozen=True)
class Config:
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    mailbox: MailboxConfig = field(default_factory=MailboxConfig)
    up: UpConfig = field(default_factory=UpConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    # Deprecated keys that were read and mapped to their new names (`config check` and every role print them).
    deprecations: tuple[str, ...] = ()
    egress: EgressConfig = field(default_factory=EgressConfig)
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    # [shaping."DESTINATION"] tables: "example.com", ".parent", "mx:mx-host-suffix" or "default".
    shaping: Mapping[str, ShapingRule] = field(default_factory=dict)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    # [aliases]: "postmaster@example.org" = ["alice@example.org"]: recipients that exist without an account.
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: types.MappingProxyType({}))


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}
_TRANSPORT = re.compile(r"smtp:\[[^\]]+\](:\d+)?|smtp:[A-Za-z0-9.-]+(:\d+)?|local|error:[45]\.\d{1,3}\.\d{1,3}( .*)?")
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object, key: str) -> Duration:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)) and m.group(2).lower() in _DURATION_UNITS:
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower() or "s"]
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)) and not m.group(2):
        seconds = float(m.group(1))
    else:
        raise ConfigError(key, f'expected a duration such as 30, "90s", "5m", "2h" or "5d", got {value!r}')
    if seconds < 0:
        raise ConfigError(key, "must not be negative")
    return Duration(seconds)


def parse_size(value: object, key: str) -> Size:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)) and m.group(2).lower() in _SIZE_UNITS:
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise ConfigError(key, f'expected a size such as 1048576, "512KiB" or "25MiB", got {value!r}')
    if size < 0:
        raise ConfigError(key, "must not be negative")
    return Size(size)


def _convert(value: object, annotation: Any, key: str) -> object:
    """Convert one TOML value to the field's declared type, or raise ConfigError."""
    if annotation is Duration:
        return parse_duration(value, key)
    if annotation is Size:
        return parse_size(value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _build_section(annotation, key, value)
    origin = typing.get_origin(annotation)
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(annotation)[0]):
        # A list of tables; a bare string stands for a table with only the first field (a pool's source name).
        item_type = typing.get_args(annotation)[0]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        first = dataclasses.fields(item_type)[0].name
        return tuple(_build_section(item_type, f"{key}[{i}]", {first: item} if isinstance(item, str) else item)
                     for i, item in enumerate(value))
    if origin in (Mapping, dict) and typing.get_args(annotation)[1] is not str:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        item_type = typing.get_args(annotation)[1]
        return types.MappingProxyType({str(k): _convert(v, item_type, f"{key}.{k}") for k, v in value.items()})
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(key, f"expected a list of strings, got an item {item!r}")
        return tuple(value)
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table of strings, got {value!r}")
        for k, v in value.items():
            if not isinstance(v, str):
                raise ConfigError(f"{key}.{k}", f"expected a string, got {v!r}")
        return types.MappingProxyType(dict(value))
    raise ConfigError(key, f"unsupported type {annotation!r}")  # pragma: no cover - a programming error


def _build_section(cls: type[Any], section: str, raw: object) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(section, f"expected a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{section}.{name}", f"unknown key (known keys: {', '.join(sorted(known))})")
    values = {name: _convert(value, hints[name], f"{section}.{name}") for name, value in raw.items()}
    return cls(**values)


def split_host_port(text: str, default_port: int | None = None, *, key: str = "address",
                    any_port: bool = False) -> tuple[str, int]:
    """The one "host:port" parser: "host:port", "[v6]:port", or "host" alone when `default_port` is given.

    Ports are 1-65535; `any_port` also allows 0 ("any free port", for listeners a test opens itself; a
    configuration never may). Raises ConfigError (a ValueError) naming `key` when the text is malformed.
    """
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(key, f'expected "host:port", got {text!r}')
    host = m.group(1) or m.group(3)
    port_text = m.group(2) or m.group(4)
    if port_text is None:
        if default_port is None:
            raise ConfigError(key, f'expected "host:port" with a port, got {text!r}')
        return host, default_port
    port = int(port_text)
    lowest = 0 if any_port else 1
    if not lowest <= port < 65536:
        raise ConfigError(key, f"port {port} is out of range {lowest}-65535")
    return host, port


def _check_bounds(config: Config) -> None:
    def at_least(key: str, value: float, minimum: float) -> None:
        if value < minimum:
            raise ConfigError(key, f"must be at least {minimum:g}, got {value:g}")

    s, q, d = config.smtp, config.queue, config.delivery
    if not s.hostname or not re.fullmatch(r"[A-Za-z0-9.-]+", s.hostname):
        raise ConfigError("smtp.hostname", f"expected a host name, got {s.hostname!r}")
    listeners = {"smtp.listen": s.listen, "smtp.submission_listen": s.submission_listen,
                 "smtp.submissions_listen": s.submissions_listen}
    if not any(listeners.values()):
        raise ConfigError("smtp.listen", "needs at least one address (or smtp.submission_listen / "
                          "smtp.submissions_listen)")
    bound: dict[tuple[str, int], str] = {}
    for key, addresses in listeners.items():
        for address in addresses:
            host_port = split_host_port(address, key=key)
            if host_port in bound:
                raise ConfigError(key, f"{address} is also in {bound[host_port]}")
            bound[host_port] = key
    for key in ("smtp.submission_listen", "smtp.submissions_listen"):
        if listeners[key] and not s.tls_cert_file:
            raise ConfigError(key, "needs smtp.tls_cert_file and smtp.tls_key_file: submission takes passwords, "
                              "only over TLS")
    for network in s.relay_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise ConfigError("smtp.relay_networks", f"{network!r} is not a network: {exc}") from None
    at_least("smtp.max_message_size", s.max_message_size, 65536)  # RFC 5321 4.5.3.1.7
    at_least("smtp.max_recipients", s.max_recipients, 1)
    at_least("smtp.max_command_line", s.max_command_line, 512)  # RFC 5321 4.5.3.1.4
    at_least("smtp.max_text_line", s.max_text_line, 1000)  # RFC 5321 4.5.3.1.6
    at_least("smtp.max_errors", s.max_errors, 1)
    at_least("smtp.max_connections_per_client", s.max_connections_per_client, 1)
    at_least("smtp.max_connections", s.max_connections, 1)
    at_least("smtp.command_timeout", s.command_timeout, 1)
    at_least("smtp.data_timeout", s.data_timeout, 1)
    at_least("smtp.inject_timeout", s.inject_timeout, 0.1)
    at_least("smtp.shutdown_grace", s.shutdown_grace, 0)
    if s.shutdown_grace > 3600:
        raise ConfigError("smtp.shutdown_grace", f"must be at most 1h, got {s.shutdown_grace:g}s")
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        missing = "smtp.tls_key_file" if s.tls_cert_file else "smtp.tls_cert_file"
        raise ConfigError(missing, "smtp.tls_cert_file and smtp.tls_key_file must be set together (or neither)")
    at_least("smtp.max_auth_failures", s.max_auth_failures, 1)
    if not q.shards:
        raise ConfigError("queue.shards", "needs at least one shard endpoint")
    for endpoint in q.shards:
        if not re.fullmatch(r"(tcp://[^\s]+:\d+|ipc://\S+)", endpoint):
            raise ConfigError("queue.shards", f'expected "tcp://host:port" or "ipc://path", got {endpoint!r}')
    if len(set(q.shards)) != len(q.shards):
        raise ConfigError("queue.shards", "lists the same endpoint twice")
    # ARCHITECTURE.md contract 5: bus traffic that leaves the host is encrypted and authenticated (CURVE).
    off_host = [e for e in q.shards if not _is_loopback_endpoint(e)]
    if off_host and not config.bus.curve_key_file:
        raise ConfigError("bus.curve_key_file", f"required: shard endpoint {off_host[0]} is not on loopback, and "
                          "bus traffic off the host must be encrypted (make a key file with `mtacluster keys`)")
    if not q.spool_dir:
        raise ConfigError("queue.spool_dir", "must not be empty")
    at_least("queue.commit_batch_max", q.commit_batch_max, 1)
    at_least("queue.lease_time", q.lease_time, 1)
    at_least("queue.heartbeat_interval", q.heartbeat_interval, 0.05)
    at_least("queue.worker_timeout", q.worker_timeout, 2 * q.heartbeat_interval)
    at_least("queue.retry_first", q.retry_first, 0.1)
    at_least("queue.retry_max", q.retry_max, q.retry_first)
    at_least("queue.max_lifetime", q.max_lifetime, 1)
    if d.smarthost:
        split_host_port(d.smarthost, 25, key="delivery.smarthost")
    if not 0 < d.port < 65536:
        raise ConfigError("delivery.port", f"port {d.port} is out of range 1-65535")
    for server in config.dns.nameservers:
        host, _ = split_host_port(server, 53, key="dns.nameservers")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError("dns.nameservers", f"{server!r}: expected an IP address (optionally :port)") from None
    at_least("dns.timeout", config.dns.timeout, 0.1)
    if s.spf not in ("reject", "tag", "off"):
        raise ConfigError("smtp.spf", f'expected "reject", "tag" or "off", got {s.spf!r}')
    at_least("auth.max_failures_per_client", config.auth.max_failures_per_client, 0)
    at_least("auth.failure_window", config.auth.failure_window, 1)
    at_least("limits.messages_per_day", config.limits.messages_per_day, 0)
    at_least("limits.recipients_per_day", config.limits.recipients_per_day, 0)
    at_least("delivery.concurrency", d.concurrency, 1)
    at_least("delivery.destination_concurrency", d.destination_concurrency, 1)
    at_least("delivery.max_recipients_per_transaction", d.max_recipients_per_transaction, 1)
    at_least("delivery.max_mx_addresses", d.max_mx_addresses, 1)
    at_least("delivery.max_deliveries_per_connection", d.max_deliveries_per_connection, 1)
    if d.tls not in ("opportunistic", "verify", "none"):
        raise ConfigError("delivery.tls", f'expected "opportunistic", "verify" or "none", got {d.tls!r}')
    for domain, route in d.transports.items():
        if not _TRANSPORT.fullmatch(route):
            raise ConfigError(
                f"delivery.transports.{domain}",
                f'expected "smtp:[host]:port", "smtp:host", "local" or "error:5.x.y text", got {route!r}',
            )
    if config.metrics.listen:
        split_host_port(config.metrics.listen, key="metrics.listen")
    if config.log.format not in ("text", "json"):
        raise ConfigError("log.format", f'expected "text" or "json", got {config.log.format!r}')
    if config.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log.level", f'expected "DEBUG", "INFO", "WARNING" or "ERROR", got {config.log.level!r}')
    at_least("up.frontends", config.up.frontends, 0)
    at_least("up.workers", config.up.workers, 0)
    _check_dkim(config.dkim)
    _check_mailbox(config.mailbox)
    _check_egress(config.egress)
    if not 0 < config.mta_sts.https_port < 65536:
        raise ConfigError("mta_sts.https_port", f"port {config.mta_sts.https_port} is out of range 1-65535")
    at_least("mta_sts.fetch_timeout", config.mta_sts.fetch_timeout, 0.1)
    _check_shaping(config.shaping)


def _check_shaping(shaping: Mapping[str, ShapingRule]) -> None:
    def at_least(key: str, value: float, minimum: float) -> None:
        if value < minimum:
            raise ConfigError(key, f"must be at least {minimum:g}, got {value:g}")

    for name, rule in shaping.items():
        key = f"shaping.{name}"
        target = name.removeprefix("mx:").removeprefix(".")
        if name != "default" and not _DOMAIN_NAME.fullmatch(target):
            raise ConfigError(key, f'expected "default", a domain, ".parent" or "mx:host-suffix", got {name!r}')
        for field_name in ("connection_limit", "max_deliveries_per_connection", "max_recipients_per_transaction"):
            if getattr(rule, field_name) < 0:
                raise ConfigError(f"{key}.{field_name}", "must not be negative (0 = inherit)")
        for field_name in ("max_message_rate", "max_connection_rate"):
            if getattr(rule, field_name):
                parse_rate(getattr(rule, field_name), f"{key}.{field_name}")
        for i, reaction in enumerate(rule.rules):
            where = f"{key}.rules[{i}]"
            try:
                re.compile(reaction.match)
            except re.error as exc:
                raise ConfigError(f"{where}.match", f"not a regular expression: {exc}") from None
            if not reaction.match:
                raise ConfigError(f"{where}.match", "required: the regular expression to look for")
            if reaction.action not in ("suspend", "rate"):
                raise ConfigError(f"{where}.action", f'expected "suspend" or "rate", got {reaction.action!r}')
            if reaction.action == "rate":
                parse_rate(reaction.rate, f"{where}.rate")
            if reaction.scope not in ("source", "destination"):
                raise ConfigError(f"{where}.scope", f'expected "source" or "destination", got {reaction.scope!r}')
            at_least(f"{where}.duration", reaction.duration, 1)


def _check_egress(egress: EgressConfig) -> None:
    for name, source in egress.sources.items():
        if source.address:
            try:
                ipaddress.ip_address(source.address)
            except ValueError:
                raise ConfigError(f"egress.sources.{name}.address",
                                  f"expected an IP address, got {source.address!r}") from None
        if source.helo_name and not _DOMAIN_NAME.fullmatch(source.helo_name):
            raise ConfigError(f"egress.sources.{name}.helo_name", f"expected a host name, got {source.helo_name!r}")
    for name, members in egress.pools.items():
        if not members:
            raise ConfigError(f"egress.pools.{name}", "needs at least one source")
        for member in members:
            if member.source not in egress.sources:
                raise ConfigError(f"egress.pools.{name}", f"names the source {member.source!r}, which is not "
                                  f"in [egress.sources] (known: {', '.join(sorted(egress.sources)) or 'none'})")
            if member.weight < 1:
                raise ConfigError(f"egress.pools.{name}", f"weight of {member.source!r} must be at least 1")
    for table, mapping in (("sender_domains", egress.sender_domains), ("users", egress.users)):
        for who, pool in mapping.items():
            if pool not in egress.pools:
                raise ConfigError(f"egress.{table}.{who}", f"names the pool {pool!r}, which is not in [egress.pools]")


def _check_dkim(dkim: DkimConfig) -> None:
    for name, entry in dkim.domains.items():
        key = f"dkim.domains.{name}"
        if name != "*" and not _DOMAIN_NAME.fullmatch(name):
            raise ConfigError(key, f'expected a domain name or "*", got {name!r}')
        if not entry.selector or not _DOMAIN_NAME.fullmatch(entry.selector):
            raise ConfigError(f"{key}.selector", f"expected a selector (letters, digits, dots, hyphens), "
                              f"got {entry.selector!r}")
        if not entry.key_file:
            raise ConfigError(f"{key}.key_file", "required: the PEM private key (`mtacluster dkim keygen`)")
        if entry.algorithm not in DKIM_ALGORITHMS:
            raise ConfigError(f"{key}.algorithm", f"expected one of {', '.join(DKIM_ALGORITHMS)}, "
                              f"got {entry.algorithm!r}")
        if name == "*" and not entry.domain:
            raise ConfigError(f"{key}.domain", 'required for "*": the domain whose key signs (d=)')
        if entry.domain and not _DOMAIN_NAME.fullmatch(entry.domain):
            raise ConfigError(f"{key}.domain", f"expected a domain name, got {entry.domain!r}")
    for header in dkim.sign_headers:
        if not re.fullmatch(r"[!-9;-~]+", header):
            raise ConfigError("dkim.sign_headers", f"{header!r} is not a header field name")


def _check_mailbox(m: MailboxConfig) -> None:
    if not m.maildir_root:
        raise ConfigError("mailbox.maildir_root", "must not be empty")
    if not m.nodes:
        raise ConfigError("mailbox.nodes", "needs at least one LMTP endpoint")
    for node in m.nodes:
        split_host_port(node, key="mailbox.nodes")
    if len({node.strip().lower() for node in m.nodes}) != len(m.nodes):
        raise ConfigError("mailbox.nodes", "lists the same endpoint twice")
    if not m.lmtp_listen:
        raise ConfigError("mailbox.lmtp_listen", "needs at least one address")
    if not m.pop3_listen and not m.pop3s_listen:
        raise ConfigError("mailbox.pop3_listen", "needs at least one address (or set mailbox.pop3s_listen)")
    for key in ("lmtp_listen", "pop3_listen", "pop3s_listen"):
        for address in getattr(m, key):
            split_host_port(address, key=f"mailbox.{key}")
    if bool(m.tls_cert_file) != bool(m.tls_key_file):
        missing = "mailbox.tls_key_file" if m.tls_cert_file else "mailbox.tls_cert_file"
        raise ConfigError(missing, "mailbox.tls_cert_file and mailbox.tls_key_file must be set together "
                          "(or neither)")
    if m.pop3s_listen and not m.tls_cert_file:
        raise ConfigError("mailbox.tls_cert_file", "required: mailbox.pop3s_listen is set, and POP3S is TLS "
                          "from the first byte (RFC 8314)")
    # ARCHITECTURE.md contract 5: traffic between cluster processes that leaves the host is encrypted. LMTP and
    # proxied POP3 to a node off loopback run under TLS (STARTTLS / STLS), which needs the nodes' certificate.
    off_host = [node for node in m.nodes if not is_loopback_host(split_host_port(node)[0])]
    if off_host and not m.tls_cert_file:
        raise ConfigError("mailbox.tls_cert_file", f"required: mailbox node {off_host[0]} is not on loopback, "
                          "and LMTP and proxied POP3 off the host must be encrypted (TLS)")
    _at_least("mailbox.max_auth_failures", m.max_auth_failures, 1)
    _at_least("mailbox.max_errors", m.max_errors, 1)
    _at_least("mailbox.idle_timeout", m.idle_timeout, 600)  # RFC 1939 3: "at least 10 minutes"
    _at_least("mailbox.max_connections", m.max_connections, 1)
    _at_least("mailbox.lmtp_timeout", m.lmtp_timeout, 1)


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum:g}, got {value:g}")


def check_readable(key: str, path: str) -> None:
    """Raise ConfigError naming `key` when the file `path` cannot be opened for reading."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def check_files(config: Config) -> None:
    """Check that the files the configuration names can be read (what `config check` adds to `load_config`).

    Kept out of `load_config` because every role reads the same file but only some mount these files (a
    queue shard has no TLS certificate). Raises ConfigError naming the key.
    """
    files: list[tuple[str, str]] = [
        ("smtp.tls_cert_file", config.smtp.tls_cert_file), ("smtp.tls_key_file", config.smtp.tls_key_file),
        ("auth.users_file", config.auth.users_file),
        ("mailbox.tls_cert_file", config.mailbox.tls_cert_file), ("mailbox.tls_key_file", config.mailbox.tls_key_file),
        ("mailbox.node_ca_file", config.mailbox.node_ca_file)]
    files.append(("mta_sts.ca_file", config.mta_sts.ca_file))
    files += list((f"dkim.domains.{name}.key_file", entry.key_file) for name, entry in config.dkim.domains.items())
    for key, path in files:
        if path:
            check_readable(key, path)


def _is_loopback_endpoint(endpoint: str) -> bool:
    if endpoint.startswith("ipc://"):
        return True
    return is_loopback_host(endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]"))


def is_loopback_host(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1): traffic that never leaves the host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_SECTIONS: dict[str, type[Any]] = {
    "smtp": SmtpConfig,
    "queue": QueueConfig,
    "delivery": DeliveryConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
    "bus": BusConfig,
    "auth": AuthConfig,
    "mailbox": MailboxConfig,
    "up": UpConfig,
    "dkim": DkimConfig,
    "egress": EgressConfig,
    "mta_sts": MtaStsConfig,
    "suppression": SuppressionConfig,
    "limits": LimitsConfig,
    "dns": DnsConfig,
}
# Sections whose keys are names the operator chooses, each a table of one type.
_NAMED_SECTIONS: dict[str, type[Any]] = {"shaping": ShapingRule}

# Keys that moved, old "section.key" -> new "section.key": still read, with a deprecation note. The pop3 role
# became the mailbox role (it owns the Maildirs and takes LMTP), so its section and the Maildir root moved.
_RENAMED = {
    "pop3.listen": "mailbox.pop3_listen",
    "pop3.tls_cert_file": "mailbox.tls_cert_file",
    "pop3.tls_key_file": "mailbox.tls_key_file",
    "pop3.max_auth_failures": "mailbox.max_auth_failures",
    "pop3.max_errors": "mailbox.max_errors",
    "pop3.idle_timeout": "mailbox.idle_timeout",
    "pop3.max_connections": "mailbox.max_connections",
    "delivery.maildir_root": "mailbox.maildir_root",
    "up.pop3": "up.mailbox",
}
_OLD_SECTIONS = frozenset(old.partition(".")[0] for old in _RENAMED) - set(_SECTIONS)


def _apply_renames(merged: dict[str, dict[str, object]]) -> tuple[str, ...]:
    """Move deprecated keys to their new names (a new name set explicitly wins); return one note per key."""
    notes = []
    for old, new in _RENAMED.items():
        old_section, _, old_key = old.partition(".")
        table = merged.get(old_section)
        if table is None or old_key not in table:
            continue
        value = table.pop(old_key)
        new_section, _, new_key = new.partition(".")
        merged.setdefault(new_section, {}).setdefault(new_key, value)
        notes.append(f"{old} is deprecated; it is read as {new} (rename it)")
    for section in _OLD_SECTIONS:
        leftover = merged.pop(section, {})
        for key in leftover:
            raise ConfigError(f"{section}.{key}", f"unknown key (the [{section}] section is deprecated; "
                              "see [mailbox])")
    return tuple(notes)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, object]]:
    overrides: dict[str, dict[str, object]] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        # The longest section name that prefixes it: MTACLUSTER_MTA_STS_CA_FILE is mta_sts.ca_file.
        section = max((s for s in _SECTIONS if rest.startswith(f"{s}_")), key=len, default="")
        key = rest[len(section) + 1:]
        if not section or not key:
            continue
        try:
            value: object = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        overrides.setdefault(section, {})[key] = value
    return overrides


def config_from_dict(raw: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Config:
    """Build a validated Config from parsed TOML (plus environment overrides)."""
    for section in raw:
        if section not in _SECTIONS and section not in _OLD_SECTIONS and section not in _NAMED_SECTIONS \
                and section != "aliases":
            raise ConfigError(section, "unknown section (known sections: "
                              f"{', '.join([*_SECTIONS, *_NAMED_SECTIONS])}, aliases)")
    aliases = _aliases(raw.get("aliases", {}))
    merged: dict[str, dict[str, object]] = {}
    for section, table in raw.items():
        if section == "aliases":
            continue
        if not isinstance(table, dict):
            raise ConfigError(section, f"expected a table, got {table!r}")
        merged[section] = dict(table)
    for section, table in _env_overrides(os.environ if environ is None else environ).items():
        merged.setdefault(section, {}).update(table)
    deprecations = _apply_renames(merged)
    sections = {name: _build_section(cls, name, merged.get(name, {})) for name, cls in _SECTIONS.items()}
    shaping = {**SHIPPED_SHAPING}
    raw_shaping = raw.get("shaping", {})
    if not isinstance(raw_shaping, dict):
        raise ConfigError("shaping", f"expected a table, got {raw_shaping!r}")
    for name, table in raw_shaping.items():
        if not isinstance(table, dict):
            raise ConfigError(f"shaping.{name}", f"expected a table, got {table!r}")
        shaping[name] = {**shaping.get(name, {}), **table}
    rules = types.MappingProxyType(
        {name: _build_section(ShapingRule, f"shaping.{name}", table) for name, table in shaping.items()})
    config = Config(**sections, shaping=rules, deprecations=deprecations, aliases=aliases)
    config = _merge_nameservers(config)
    _check_bounds(config)
    return config


def _aliases(raw: object) -> Mapping[str, tuple[str, ...]]:
    """[aliases]: address -> list of addresses (a single string is a list of one); keys are lower-cased."""
    if not isinstance(raw, dict):
        raise ConfigError("aliases", f"expected a table of address = [addresses], got {raw!r}")
    aliases: dict[str, tuple[str, ...]] = {}
    for alias, targets in raw.items():
        key = f"aliases.{alias}"
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(key, f"expected a non-empty list of addresses, got {targets!r}")
        for address in (alias, *targets):
            local, at, domain = address.rpartition("@")
            if not at or not local or not domain or any(c.isspace() or c in "<>" for c in address):
                raise ConfigError(key, f"{address!r} is not an address (local@domain)")
        aliases[alias.lower()] = tuple(targets)
    return types.MappingProxyType(aliases)


def _merge_nameservers(config: Config) -> Config:
    """`delivery.nameservers` is the old name of `dns.nameservers`: one list, read from either."""
    old, new = config.delivery.nameservers, config.dns.nameservers
    if old and new and old != new:
        raise ConfigError("delivery.nameservers", "is the old name of dns.nameservers: set only dns.nameservers")
    servers = new or old
    return dataclasses.replace(config, dns=dataclasses.replace(config.dns, nameservers=servers),
                               delivery=dataclasses.replace(config.delivery, nameservers=servers))


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML configuration file; None means the built-in defaults."""
    raw: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return config_from_dict(raw, environ)


def with_overrides(config: Config, **sections: Mapping[str, object]) -> Config:
    """Return a copy of `config` with some fields of some sections replaced (used by the supervisor)."""
    changes = {name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()}
    return dataclasses.replace(config, **changes)
