"""What `make bench` runs: the loads, which systems run each, and in what order.

Scenarios (issue 12): "standard" (N x S KiB over C sessions, with the latency probe; ours beside Postfix),
"signed" (the standard load through ours with DKIM signing: signed beside ours), "bulk" (`smtp-source -r R`:
R recipients per message; delivered recipients/s) and "large" (1 MiB messages; delivered/s and each role's
peak RSS). "signed" runs on the standard load, so there are three loads: standard, bulk and large.

A system is "postfix", "ours" (`mtacluster up` with the run's --frontends/--workers), "signed" (ours + DKIM),
or "ours-<F>f<W>w" (ours with F frontends and W workers, from --compare-layout: the process-count question).

`round_plan(loads)` is the order: round-major (round 1 of every load, then round 2, ...) so that a time limit
cuts rounds, not whole scenarios, and Postfix first within each load. Everything here is pure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

SCENARIOS = ("standard", "signed", "bulk", "large")
SYSTEMS = ("ours", "signed", "postfix")
_LAYOUT = re.compile(r"ours-(\d+)f(\d+)w")


@dataclass(frozen=True)
class Load:
    name: str  # "standard", "bulk" or "large"
    messages: int
    size_kib: int
    sessions: int
    rounds: int
    systems: tuple[str, ...]
    recipients: int = 1  # per message: smtp-source -r
    probe: bool = False  # run the latency probe beside smtp-source

    @property
    def counts_recipients(self) -> bool:
        """Whether the sink must count recipients (not only messages) to know when everything arrived."""
        return self.recipients > 1

    def describe(self) -> str:
        size = f"{self.size_kib // 1024} MiB" if self.size_kib % 1024 == 0 else f"{self.size_kib} KiB"
        recipients = f", {self.recipients} recipients each" if self.recipients > 1 else ""
        return f"{self.messages} x {size}{recipients}, {self.sessions} sessions"


def layout_system(frontends: int, workers: int) -> str:
    return f"ours-{frontends}f{workers}w"


def parse_layout_system(system: str) -> tuple[int, int] | None:
    """(frontends, workers) of an "ours-<F>f<W>w" system name; None for any other name."""
    match = _LAYOUT.fullmatch(system)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_layout(text: str) -> tuple[int, int]:
    """"F/W" (frontends/workers, each at least 1) -> (F, W); ValueError otherwise."""
    frontends, slash, workers = text.partition("/")
    if not slash or not frontends.isdigit() or not workers.isdigit() or int(frontends) < 1 or int(workers) < 1:
        raise ValueError(f"expected FRONTENDS/WORKERS such as 1/1, got {text!r}")
    return int(frontends), int(workers)


def plan_loads(scenarios: Sequence[str], systems: Sequence[str], standard: Load, bulk: Load, large: Load,
               compare_layouts: Sequence[tuple[int, int]] = ()) -> list[Load]:
    """The loads to run, each with the systems that run it, for the chosen scenarios and systems.

    `standard`, `bulk` and `large` give each load's size and rounds (their `systems` are ignored); loads that no
    chosen system runs are dropped."""
    chosen = set(scenarios)
    allowed = set(systems)
    on_standard = [
        *(["postfix"] if "standard" in chosen else []),
        *(["ours"] if chosen & {"standard", "signed"} or compare_layouts else []),
        *(["signed"] if "signed" in chosen else []),
    ]
    on_standard = [system for system in on_standard if system in allowed]
    if "ours" in allowed:
        on_standard += [layout_system(f, w) for f, w in dict.fromkeys(compare_layouts)]
    pair = tuple(system for system in ("postfix", "ours") if system in allowed)
    loads = [replace(standard, name="standard", systems=tuple(on_standard), recipients=1, probe=True)]
    if "bulk" in chosen:
        loads.append(replace(bulk, name="bulk", systems=pair, probe=False))
    if "large" in chosen:
        loads.append(replace(large, name="large", systems=pair, recipients=1, probe=False))
    return [load for load in loads if load.systems]


def round_plan(loads: Sequence[Load]) -> list[tuple[int, Load, str]]:
    """(round number, load, system) in run order: round-major across loads, Postfix first in each load."""
    plan: list[tuple[int, Load, str]] = []
    for number in range(1, max((load.rounds for load in loads), default=0) + 1):
        for load in loads:
            if number <= load.rounds:
                plan.extend((number, load, system) for system in sorted(load.systems, key=lambda s: s != "postfix"))
    return plan
