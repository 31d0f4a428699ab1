"""One measured run of one system under one load (`SideResult`), and its figures as a flat dict.

`round_figures(result)` turns a run into {figure key: value}: the rates, the probe's latency percentiles, the
CPU milliseconds per message (in total, and per role as "cpu_ms_per_message.<role>"), the same for the load's
own processes ("load_cpu_ms_per_message", and per tool: smtp-source, smtp-sink, the harness with its latency
probe) and, for ours, each role's peak RSS ("peak_rss_mib.<role>"). Figures a run did not measure are absent.
`figures(rounds)` is each figure's median over the rounds that measured it. Pure: nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.stats import LatencySummary, median


@dataclass
class SideResult:
    system: str
    load: str = "standard"
    source_messages: int = 0
    probe_messages: int = 0
    recipients_per_message: int = 1
    accept_seconds: float | None = None
    deliver_seconds: float | None = None
    accepted_per_s: float | None = None
    source_accepted_per_s: float | None = None
    delivered_per_s: float | None = None
    # Recipients the sink received per second (bulk: smtp-source -r sends several per message).
    delivered_recipients_per_s: float | None = None
    latency: LatencySummary | None = None
    probe_refused: int = 0
    probe_errors: int = 0
    # Messages (recipients, for a load that counts them) the sink received beyond those sent: duplicates.
    sink_extra: int = 0
    sink_expected: int = 0
    # ours only: figures from the queue shard's own /metrics, scraped after the run.
    shard_metrics: dict[str, float] = field(default_factory=dict)
    # signed only: the frontends' DKIM signing time (signed, sign_ms_mean), from their /metrics.
    signing: dict[str, float] = field(default_factory=dict)
    # CPU milliseconds per accepted message: per role for ours, all processes together for Postfix.
    cpu_ms_per_message: dict[str, float] = field(default_factory=dict)
    # CPU milliseconds per accepted message of what makes and measures the load on the same cores:
    # "smtp-source", "smtp-sink", and "harness" (this process: the latency probe, the sink's counters).
    load_cpu_ms_per_message: dict[str, float] = field(default_factory=dict)
    # ours only: per role, the largest RSS of any of its processes while the load ran (MiB), sampled from
    # /proc/PID/status VmRSS, and the kernel's high-water mark VmHWM.
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    sampled_rss_mib: dict[str, float] = field(default_factory=dict)
    error: str = ""
    notes: list[str] = field(default_factory=list)


def round_figures(result: SideResult) -> dict[str, float]:
    values: dict[str, float | None] = {
        "accepted_per_s": result.accepted_per_s,
        "delivered_per_s": result.delivered_per_s,
        "delivered_recipients_per_s": result.delivered_recipients_per_s if result.recipients_per_message > 1
        else None,
    }
    if result.latency is not None:
        values.update(p50_ms=result.latency.p50_ms, p90_ms=result.latency.p90_ms, p99_ms=result.latency.p99_ms)
    if result.cpu_ms_per_message:
        values["cpu_ms_per_message"] = sum(result.cpu_ms_per_message.values())
        if len(result.cpu_ms_per_message) > 1 or result.system != "postfix":
            values.update({f"cpu_ms_per_message.{role}": ms for role, ms in result.cpu_ms_per_message.items()})
    if result.load_cpu_ms_per_message:
        values["load_cpu_ms_per_message"] = sum(result.load_cpu_ms_per_message.values())
        values.update({f"load_cpu_ms_per_message.{tool}": ms for tool, ms in result.load_cpu_ms_per_message.items()})
    values.update({f"peak_rss_mib.{role}": mib for role, mib in result.peak_rss_mib.items()})
    return {key: value for key, value in values.items() if value is not None}


def figures(rounds: Sequence[SideResult]) -> dict[str, float]:
    """Each figure's median over the rounds that measured it (absent when none did)."""
    per_round = [round_figures(result) for result in rounds if not result.error]
    keys = dict.fromkeys(key for one in per_round for key in one)
    medians = {key: median([one[key] for one in per_round if key in one]) for key in keys}
    return {key: value for key, value in medians.items() if value is not None}


def measured_rounds(rounds: Sequence[SideResult]) -> int:
    return sum(1 for result in rounds if not result.error)


def duplicates(rounds: Sequence[SideResult]) -> int:
    return sum(result.sink_extra for result in rounds)
