"""What `make bench` prints: one table per scenario, each system's figures side by side with their ratio, and
one JSON line with every figure.

`comparisons(scenarios, loads)` says which tables there are: standard (ours beside Postfix), signed (signed
beside ours, on the standard load), one per --compare-layout (that layout beside ours), bulk and large (ours
beside Postfix). `render_table(comparison, results)` and `json_line(settings, comparisons, loads, results)` are
pure; `results` maps load name -> system -> the runs (`SideResult`) of every round. Each figure is the median
over the rounds that measured it; the ratio column is first/second (above 1 is better for rates, below 1 for
latencies, CPU and memory). The large table flags every role whose peak RSS went above `rss_limit_mib`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from benchmarks.results import SideResult, duplicates, figures, measured_rounds
from benchmarks.scenarios import Load, parse_layout_system
from benchmarks.stats import ratio

Results = Mapping[str, Mapping[str, Sequence[SideResult]]]

# Table rows in this order; per-role figures ("cpu_ms_per_message.<role>", "peak_rss_mib.<role>") follow
# their total, one row per role.
LABELS = {
    "accepted_per_s": "accepted/s",
    "delivered_per_s": "delivered/s",
    "delivered_recipients_per_s": "delivered recipients/s",
    "p50_ms": "accept p50 ms",
    "p90_ms": "accept p90 ms",
    "p99_ms": "accept p99 ms",
    "cpu_ms_per_message": "CPU ms/message",
    "load_cpu_ms_per_message": "load CPU ms/message",
}
ROLE_LABELS = {"cpu_ms_per_message": "  CPU ms/message {role}", "peak_rss_mib": "peak RSS MiB {role}",
               "load_cpu_ms_per_message": "  load CPU ms/message {role}"}


@dataclass(frozen=True)
class Comparison:
    scenario: str  # the table's name and its key in the JSON's "scenarios"
    load: Load
    first: str
    second: str
    show_rss: bool = False

    @property
    def title(self) -> str:
        return (f"{self.scenario}: {self.load.describe()}; median of {self.load.rounds} "
                f"round{'s' if self.load.rounds != 1 else ''}")


def comparisons(scenarios: Sequence[str], loads: Sequence[Load]) -> list[Comparison]:
    by_name = {load.name: load for load in loads}
    out = []
    standard = by_name.get("standard")
    if standard is not None:
        if "standard" in scenarios:
            out.append(Comparison("standard", standard, "ours", "postfix"))
        if "signed" in scenarios:
            out.append(Comparison("signed", standard, "signed", "ours"))
        for system in standard.systems:
            layout = parse_layout_system(system)
            if layout is not None:
                out.append(Comparison(f"layout {layout[0]}/{layout[1]}", standard, system, "ours"))
    if "bulk" in by_name:
        out.append(Comparison("bulk", by_name["bulk"], "ours", "postfix"))
    if "large" in by_name:
        out.append(Comparison("large", by_name["large"], "ours", "postfix", show_rss=True))
    return out


def _ordered_keys(first: Mapping[str, float], second: Mapping[str, float], show_rss: bool) -> list[str]:
    present = set(first) | set(second)
    keys = []
    for key in LABELS:
        if key in present:
            keys.append(key)
        keys.extend(sorted(k for k in present if k.startswith(f"{key}.")))
    if show_rss:
        keys.extend(sorted(k for k in present if k.startswith("peak_rss_mib.")))
    return keys


def label(key: str) -> str:
    base, _, role = key.partition(".")
    return ROLE_LABELS[base].format(role=role) if role else LABELS[base]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def over_limit(rss: Mapping[str, float], limit_mib: float) -> dict[str, float]:
    """The roles whose peak RSS (MiB) went above the limit."""
    return {key.partition(".")[2]: mib for key, mib in rss.items()
            if key.startswith("peak_rss_mib.") and mib > limit_mib}


def render_table(comparison: Comparison, results: Results, rss_limit_mib: float = 200.0) -> str:
    c = comparison
    runs = results.get(c.load.name, {})
    first, second = figures(runs.get(c.first, ())), figures(runs.get(c.second, ()))
    rows = [("figure", c.first, c.second, f"{c.first}/{c.second}")]
    for key in _ordered_keys(first, second, c.show_rss):
        rows.append((label(key), _fmt(first.get(key)), _fmt(second.get(key)),
                     _fmt(ratio(first.get(key), second.get(key)), 2)))
    rows.append(("rounds measured", str(measured_rounds(runs.get(c.first, ()))),
                 str(measured_rounds(runs.get(c.second, ()))), ""))
    unit = "recipients" if c.load.counts_recipients else "messages"
    rows.append((f"duplicate {unit} at sink", str(duplicates(runs.get(c.first, ()))),
                 str(duplicates(runs.get(c.second, ()))), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [c.title]
    lines += ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
              for row in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    if c.show_rss:
        above = over_limit(first, rss_limit_mib)
        lines.append(f"RSS above {rss_limit_mib:g} MiB ({c.first}): "
                     + (", ".join(f"{role} {mib:,.1f} MiB" for role, mib in above.items()) if above else "none"))
    return "\n".join(lines)


def scenario_summary(comparison: Comparison, results: Results, rss_limit_mib: float) -> dict[str, object]:
    c = comparison
    runs = results.get(c.load.name, {})
    first, second = figures(runs.get(c.first, ())), figures(runs.get(c.second, ()))
    summary: dict[str, object] = {
        "load": c.load.name, "messages": c.load.messages, "size_kib": c.load.size_kib,
        "sessions": c.load.sessions, "recipients_per_message": c.load.recipients, "rounds": c.load.rounds,
        c.first: first, c.second: second, "ratio_of": f"{c.first}/{c.second}",
        "ratio": {key: ratio(first.get(key), second.get(key)) for key in _ordered_keys(first, second, True)},
        "rounds_measured": {s: measured_rounds(runs.get(s, ())) for s in (c.first, c.second)},
        "duplicates": {s: duplicates(runs.get(s, ())) for s in (c.first, c.second)},
    }
    if c.show_rss:
        summary["rss_limit_mib"] = rss_limit_mib
        summary["rss_over_limit"] = over_limit(first, rss_limit_mib)
    return summary


def json_line(settings: Mapping[str, object], tables: Sequence[Comparison], results: Results,
              rss_limit_mib: float = 200.0) -> str:
    payload: dict[str, object] = {
        "benchmark": "e2e",
        "settings": dict(settings),
        "scenarios": {c.scenario: scenario_summary(c, results, rss_limit_mib) for c in tables},
        "details": {load: {system: [asdict(run) for run in runs] for system, runs in by_system.items()}
                    for load, by_system in results.items()},
    }
    return json.dumps(payload, sort_keys=True, default=str)
