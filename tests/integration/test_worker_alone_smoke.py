"""benchmarks/worker_alone.py, run tiny: the worker-alone measurement keeps working (every job delivered to the
sink through a real worker process, its CPU figure measured), and its sampling profile names the worker's code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import REPO
from tests.support.tooling import require_tool

pytestmark = pytest.mark.integration


def test_worker_alone_benchmark_runs_tiny(tmp_path: Path) -> None:
    require_tool("smtp-sink")
    stacks = tmp_path / "worker.stacks"
    result = subprocess.run([sys.executable, "-m", "benchmarks.worker_alone", "--messages", "300", "--warmup", "20",
                             "--recipients", "2", "--profile", str(stacks), "--time-limit", "60"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert (figures["messages"], figures["recipients"]) == (300, 2)
    assert figures["cpu_ms_per_message"] > 0 and figures["messages_per_second"] > 0
    summary = subprocess.run([sys.executable, "-m", "benchmarks.worker_alone", "--summarize", str(stacks)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0 and "_run_job (worker.py" in summary.stdout, summary.stdout + summary.stderr
