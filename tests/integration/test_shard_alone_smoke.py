"""benchmarks/shard_alone.py, run tiny: the shard-alone measurement keeps working, and every message is stored
and delivered exactly once through it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("rate", ["0", "400"])
def test_shard_alone_benchmark_runs_tiny(rate: str) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.shard_alone", "--messages", "200", "--rate", rate,
                             "--time-limit", "60"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert (figures["messages"], figures["refused"], figures["delivered"]) == (200, 0, 200)
    assert figures["cpu_ms_per_message"] > 0 and 0 < figures["transactions_per_message"] <= 3
    assert 0 < figures["stored_p50_ms"] <= figures["stored_p99_ms"]


def test_shard_alone_runs_several_recipients_from_a_source_directory_profiled(tmp_path: Path) -> None:
    """--recipients, --source (the shard imports `cluster` from that directory) and --cpu-profile (the CPU-time
    sampler's collapsed stacks) together; the per-thread CPU figures come with them."""
    profile = tmp_path / "shard.txt"
    result = subprocess.run([sys.executable, "-m", "benchmarks.shard_alone", "--messages", "600", "--recipients", "3",
                             "--source", str(REPO), "--cpu-profile", str(profile), "--time-limit", "60"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert (figures["messages"], figures["refused"], figures["delivered"]) == (600, 0, 1800)
    assert figures["thread_main_ms_per_message"] > 0
    # Every sample is of the profiled shard process (not the harness), and some were taken once it was serving:
    # start-up (configuration, imports, building the service inside `_serve`) is most of the samples. A single
    # named frame of the serving loop is no good marker: at one sample per CPU millisecond it was on 0 to 2 of
    # the ~40 samples of a 60-message run, so the test failed by chance; 600 messages give tens of serving samples.
    stacks = profile.read_text().splitlines()
    assert stacks and all(";serve_shard (shard_alone.py:" in stack for stack in stacks), stacks[:3]
    serving = [stack for stack in stacks if ";serve (roles.py:" in stack and ";_serve (roles.py:" not in stack]
    assert sum(int(stack.rpartition(" ")[2]) for stack in serving) >= 5, stacks
