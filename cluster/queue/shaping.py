"""Traffic shaping of one shard's destinations (pure: no I/O, time comes in as `now`).

Inputs: the `[shaping]` entries (cluster/config.py, shipped provider defaults included), the scheduler's default
concurrency and recipients per job, and what the shard learns from Results: the MX host that answered for a
domain (`learn_mx`), the replies of deferrals and failures (`react`).
Which entries apply to a domain, least specific first: "default", an "mx:SUFFIX" rollup whose suffix ends the
domain's MX host name, ".parent" suffixes (shorter first), the domain itself; each key set in a more specific
entry wins. Counters are kept per bucket: the rollup name when an "mx:" entry applies (every domain hosted
there shares its limits, as the MX serves them all), else the domain. (Since one shard owns a domain, the
limits of a domain hold cluster-wide; a rollup's limits hold per shard.)
Egress sources (issue 13: limits apply per (source, destination)): a message whose egress pool (`[egress.pools]`,
chosen by the frontend) the shard knows leaves from a source the shard picks here, at dispatch (`choose`): at
random in proportion to the pool's weights among the pool's sources that may start now. Each (bucket, source)
then has its own counters: N/s per destination with two sources in the pool is 2N/s in total. A pool name
this shard does not know uses the "default" pool if there is one; no pool (or none known): the bucket's own
counters and source "" (the worker's default address).
Limits: `connection_limit` jobs at once (each job is one connection's worth of work); `max_message_rate` and
`max_connection_rate` "N/period": at most N job starts in any sliding period (a job carries one message);
`max_recipients_per_transaction` recipients per job; `max_deliveries_per_connection` goes to the worker with
the job. Rate-limited mail simply stays ready: it is neither attempted nor counted as a failed attempt, and
`next_due` tells the shard when to look again.
Reactions: a reply matching a rule's regex suspends the bucket (no job starts) or replaces its message rate,
for the rule's duration; with a pool, only for the source the reply came through, unless the rule's `scope`
is "destination" (then every source of the bucket: suspended, or each held to the rule's rate).
`status` shows what is in force and why, one row per destination and per source seen for it.
Metrics: mtacluster_shaping_delays_total and mtacluster_shaping_suspensions_total{destination, source}
(source "": no pool, or the whole destination).
Failure modes: none; unknown domains get the default entry.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.config import EgressConfig, ShapingReaction, ShapingRule, parse_rate
from cluster.queue import metrics

Rate = tuple[int, float]


@dataclass(frozen=True)
class Limits:
    bucket: str
    entries: tuple[str, ...]
    connection_limit: int
    message_rate: Rate | None
    connection_rate: Rate | None
    max_deliveries_per_connection: int
    max_recipients: int
    reactions: tuple[ShapingReaction, ...]


@dataclass
class Bucket:
    in_flight: int = 0
    starts: list[float] = field(default_factory=list)  # job start times, oldest first
    suspended_until: float = 0.0
    rate_override: Rate | None = None
    override_until: float = 0.0
    reason: str = ""
    held_back: bool = False


class Shaper:
    def __init__(self, rules: Mapping[str, ShapingRule], default_concurrency: int, default_recipients: int,
                 metric_label: Any = None, egress: EgressConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self._rules = dict(rules)
        self._default_concurrency = default_concurrency
        self._default_recipients = default_recipients
        self._rollups = sorted((name for name in rules if name.startswith("mx:")), key=len, reverse=True)
        self._mx: dict[str, str] = {}
        self._limits: dict[str, Limits] = {}
        # (bucket, source) -> counters; source "" holds the bucket's own (no pool) and destination-wide state.
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._next_due = math.inf
        self._label = metric_label or (lambda bucket: bucket)
        self._rng = rng or random.Random()
        # Pool name -> its source names and weights.
        self._pools: dict[str, tuple[list[str], list[int]]] = {
            pool: ([m.source for m in members], [m.weight for m in members])
            for pool, members in (egress.pools.items() if egress is not None else ())}

    @property
    def uses_pools(self) -> bool:
        """True when some egress pool is configured (the scheduler then tells `choose` each message's pool)."""
        return bool(self._pools)

    # -- configuration ------------------------------------------------------------------------------------

    def learn_mx(self, domain: str, host: str) -> None:
        host = host.lower().rstrip(".")
        if host and self._mx.get(domain) != host:
            self._mx[domain] = host
            self._limits.pop(domain, None)

    def limits(self, domain: str) -> Limits:
        found = self._limits.get(domain)
        if found is None:
            found = self._limits[domain] = self._resolve(domain)
        return found

    def _resolve(self, domain: str) -> Limits:
        names: list[str] = ["default"] if "default" in self._rules else []
        host = self._mx.get(domain, "")
        rollup = next((r for r in self._rollups if host == r[3:] or host.endswith("." + r[3:])), None)
        if rollup is not None:
            names.append(rollup)
        labels = domain.split(".")
        names += [p for p in ("." + ".".join(labels[i:]) for i in range(len(labels) - 1, 0, -1)) if p in self._rules]
        if domain in self._rules:
            names.append(domain)
        merged: dict[str, Any] = {}
        for name in names:
            rule = self._rules[name]
            for key in ("connection_limit", "max_message_rate", "max_connection_rate",
                        "max_deliveries_per_connection", "max_recipients_per_transaction"):
                if getattr(rule, key):
                    merged[key] = getattr(rule, key)
            merged.setdefault("reactions", ())
            merged["reactions"] = (*rule.rules, *merged["reactions"])  # the most specific first
        rates = {key: parse_rate(merged[key], key) if key in merged else None
                 for key in ("max_message_rate", "max_connection_rate")}
        return Limits(rollup or domain, tuple(names), merged.get("connection_limit", self._default_concurrency),
                      rates["max_message_rate"], rates["max_connection_rate"],
                      merged.get("max_deliveries_per_connection", 0),
                      merged.get("max_recipients_per_transaction", self._default_recipients),
                      merged.get("reactions", ()))

    def _bucket(self, name: str, source: str = "") -> Bucket:
        bucket = self._buckets.get((name, source))
        if bucket is None:
            bucket = self._buckets[(name, source)] = Bucket()
        return bucket

    def _pool(self, pool: str) -> tuple[list[str], list[int]] | None:
        if not pool:
            return None
        return self._pools.get(pool) or self._pools.get("default")

    # -- the scheduler's questions ------------------------------------------------------------------------

    def may_start(self, domain: str, now: float) -> bool:
        """True when a job to `domain` (no pool) may start now; else it waits (`next_due` says when to ask)."""
        return self.choose(domain, now) is not None

    def choose(self, domain: str, now: float, pool: str = "") -> str | None:
        """The source a job to `domain` of a message in `pool` starts from now ("" = no pool: the worker's
        default address), or None: every source is at its limits, the job waits (`next_due` says when to ask
        again, or a finishing job frees a connection slot and wakes the dispatcher)."""
        limits = self.limits(domain)
        whole = self._bucket(limits.bucket)
        members = self._pool(pool)
        if members is None:
            return "" if self._open(limits, whole, whole, now, "") else None
        open_names: list[str] = []
        open_weights: list[int] = []
        for name, weight in zip(*members, strict=True):
            if self._open(limits, self._bucket(limits.bucket, name), whole, now, name):
                open_names.append(name)
                open_weights.append(weight)
        if not open_names:
            return None
        return open_names[0] if len(open_names) == 1 else self._rng.choices(open_names, open_weights)[0]

    def _open(self, limits: Limits, bucket: Bucket, whole: Bucket, now: float, source: str) -> bool:
        """True when `bucket` (the counters of `source`, or the whole destination's for source "") may start a
        job now; `whole` holds the destination-wide suspension and rate override."""
        if bucket.in_flight >= limits.connection_limit:
            return False  # a finishing job frees the slot and wakes the dispatcher
        wait_until = max((s for s in (bucket.suspended_until, whole.suspended_until) if s > now), default=0.0)
        rates = self._rates(limits, bucket, whole, now)
        if rates:
            # Forget starts older than the longest period in force; then, per rate, the count-th most recent
            # start must have left its period before another may start.
            del bucket.starts[:bisect.bisect_right(bucket.starts, now - max(period for _, period in rates))]
            for count, period in rates:
                recent = len(bucket.starts) - bisect.bisect_right(bucket.starts, now - period)
                if recent >= count:
                    wait_until = max(wait_until, bucket.starts[-count] + period)
        if wait_until > now:
            self._next_due = min(self._next_due, wait_until)
            if not bucket.held_back:
                bucket.held_back = True
                metrics.SHAPING_DELAYS.labels(self._label(limits.bucket), source).inc()
            return False
        bucket.held_back = False
        return True

    @staticmethod
    def _rates(limits: Limits, bucket: Bucket, whole: Bucket, now: float) -> list[Rate]:
        rates = [r for r in (limits.connection_rate,) if r is not None]
        message_rate = (bucket.rate_override if bucket.override_until > now
                        else whole.rate_override if whole.override_until > now else limits.message_rate)
        if message_rate is not None:
            rates.append(message_rate)
        return rates

    def started(self, domain: str, now: float, source: str = "") -> str:
        """A job to `domain` starts from `source` (what `choose` said); returns its bucket's name, to give
        back to `finished` with the source."""
        limits = self.limits(domain)
        bucket = self._bucket(limits.bucket, source)
        bucket.in_flight += 1
        bisect.insort(bucket.starts, now)
        return limits.bucket

    def finished(self, bucket_name: str, source: str = "") -> None:
        bucket = self._buckets.get((bucket_name, source))
        if bucket is not None:
            bucket.in_flight = max(0, bucket.in_flight - 1)

    def due(self, now: float) -> bool:
        """True (once) when a destination held back by a rate or a suspension may start again."""
        if self._next_due <= now:
            self._next_due = math.inf
            return True
        return False

    # -- reactions ----------------------------------------------------------------------------------------

    def react(self, domain: str, reply: str, now: float, source: str = "") -> ShapingReaction | None:
        """Apply the first reaction rule whose regex is found in `reply` (that came through `source`, "" = no
        pool) to that source's counters, or to the whole destination when the rule's scope says so; returns
        the rule (None when none matched)."""
        limits = self.limits(domain)
        for rule in limits.reactions:
            if not re.search(rule.match, reply):
                continue
            scope = "" if rule.scope == "destination" else source
            bucket = self._bucket(limits.bucket, scope)
            bucket.reason = f"{rule.action} until {now + rule.duration:.0f} after {reply[:200]!r}"
            if rule.action == "suspend":
                bucket.suspended_until = max(bucket.suspended_until, now + rule.duration)
                metrics.SHAPING_SUSPENSIONS.labels(self._label(limits.bucket), scope).inc()
            else:
                bucket.rate_override = parse_rate(rule.rate, "rate")
                bucket.override_until = now + rule.duration
            return rule
        return None

    def status(self, now: float) -> list[dict[str, Any]]:
        """What is in force per destination bucket and per source seen for it ("" = the destination as a
        whole, or no pool), and why (for `mtacluster shaping status`)."""
        sources: dict[str, list[str]] = {}
        for name, source in sorted(self._buckets):
            sources.setdefault(name, []).append(source)
        rows = []
        for domain, limits in sorted(self._limits.items()):
            whole = self._buckets.get((limits.bucket, ""), Bucket())
            for source in sources.get(limits.bucket, [""]):
                bucket = self._buckets.get((limits.bucket, source), Bucket())
                rate = (bucket.rate_override if bucket.override_until > now
                        else whole.rate_override if whole.override_until > now else limits.message_rate)
                until = max(bucket.suspended_until, bucket.override_until)
                rows.append({
                    "destination": domain, "bucket": limits.bucket, "source": source,
                    "entries": list(limits.entries), "mx": self._mx.get(domain, ""),
                    "connection_limit": limits.connection_limit, "in_flight": bucket.in_flight,
                    "max_message_rate": _rate_text(rate), "max_connection_rate": _rate_text(limits.connection_rate),
                    "max_deliveries_per_connection": limits.max_deliveries_per_connection,
                    "max_recipients_per_transaction": limits.max_recipients,
                    "suspended_until": bucket.suspended_until if bucket.suspended_until > now else None,
                    "rate_override_until": bucket.override_until if bucket.override_until > now else None,
                    "reason": bucket.reason if until > now else "",
                })
        return rows


def _rate_text(rate: Rate | None) -> str:
    if rate is None:
        return ""
    unit = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "d"}.get(rate[1], f"{rate[1]:g}s")
    return f"{rate[0]}/{unit}"
