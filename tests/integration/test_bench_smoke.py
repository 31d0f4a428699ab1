"""`make bench` (benchmarks/e2e.py), run tiny: every scenario once, ours and Postfix, and a JSON line with every
figure the issue asks for (issue 12). The measurement itself stays out of the timed suite; this proves it runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.support.harness import REPO
from tests.support.tooling import require_root, require_tool

pytestmark = pytest.mark.integration

ROLES = {"frontend", "queue", "worker"}
TINY = ["--messages", "20", "--rounds", "1", "--probe-sessions", "1",
        "--bulk-messages", "3", "--bulk-recipients", "5", "--bulk-rounds", "1",
        "--large-messages", "3", "--large-size", "256", "--large-rounds", "1", "--time-limit", "200"]


def test_benchmark_runs_every_scenario_on_a_tiny_load() -> None:
    for tool in ("postfix", "smtp-source", "smtp-sink"):
        require_tool(tool)
    require_root("the private Postfix instance of the benchmark must be started as root")
    result = subprocess.run([sys.executable, "-m", "benchmarks.e2e", *TINY], cwd=REPO, capture_output=True,
                            text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    *tables, last = result.stdout.strip().splitlines()
    for title in ("standard: 20 x 4 KiB, 20 sessions; median of 1 round",
                  "signed: 20 x 4 KiB, 20 sessions; median of 1 round",
                  "bulk: 3 x 4 KiB, 5 recipients each, 20 sessions; median of 1 round",
                  "large: 3 x 256 KiB, 20 sessions; median of 1 round"):
        assert title in tables
    assert "RSS above 200 MiB (ours): none" in tables
    scenarios = json.loads(last)["scenarios"]
    assert set(scenarios) == {"standard", "signed", "bulk", "large"}

    standard = scenarios["standard"]
    for system in ("ours", "postfix"):
        figures = standard[system]
        for key in ("accepted_per_s", "delivered_per_s", "p50_ms", "p90_ms", "p99_ms", "cpu_ms_per_message"):
            assert figures[key] >= 0, (system, key)
        assert figures["delivered_per_s"] > 0 and figures["p50_ms"] > 0
        # The CPU the load itself took from the same cores: smtp-source, smtp-sink, the harness (probe).
        assert figures["load_cpu_ms_per_message.smtp-source"] > 0, (system, figures)
        assert figures["load_cpu_ms_per_message.smtp-sink"] >= 0, (system, figures)  # /proc counts 10 ms ticks
        assert figures["load_cpu_ms_per_message.harness"] > 0, (system, figures)
    assert {f"cpu_ms_per_message.{role}" for role in ROLES} <= set(standard["ours"])
    assert standard["ratio"]["accepted_per_s"] > 0 and standard["ratio"]["p99_ms"] > 0

    signed = scenarios["signed"]
    assert signed["ratio_of"] == "signed/ours" and signed["ratio"]["delivered_per_s"] > 0
    details = json.loads(last)["details"]
    signed_notes = " ".join(details["standard"]["signed"][0]["notes"])
    signed_count = re.search(r"messages DKIM-signed at acceptance: (\d+)", signed_notes)
    assert signed_count and int(signed_count.group(1)) >= 20
    # The frontends' own signing figure, from their /metrics.
    signing = details["standard"]["signed"][0]["signing"]
    assert signing["signed"] >= 20 and signing["sign_ms_mean"] > 0

    bulk = scenarios["bulk"]
    for system in ("ours", "postfix"):
        assert bulk[system]["delivered_recipients_per_s"] > bulk[system]["delivered_per_s"] > 0
        # 3 messages of 5 recipients, plus the warm-up message's one.
        assert details["bulk"][system][0]["sink_expected"] == 16
    assert bulk["ratio"]["delivered_recipients_per_s"] > 0

    large = scenarios["large"]
    assert large["ours"]["delivered_per_s"] > 0 and large["postfix"]["delivered_per_s"] > 0
    assert {role for key in large["ours"] if key.startswith("peak_rss_mib.")
            for role in [key.partition(".")[2]]} == ROLES
    assert all(large["ours"][f"peak_rss_mib.{role}"] > 10 for role in ROLES)
    assert large["rss_over_limit"] == {}

    for scenario in scenarios.values():
        assert set(scenario["rounds_measured"].values()) == {1}
        assert set(scenario["duplicates"].values()) == {0}
