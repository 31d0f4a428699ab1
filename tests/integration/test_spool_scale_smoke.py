"""benchmarks/spool_scale.py, run tiny: the million-message measurement (issue 11) keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import REPO

pytestmark = pytest.mark.integration


def test_spool_scale_benchmark_runs_tiny(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.spool_scale", "--messages", "300", "--size", "512",
                             "--batch", "100", "--domains", "7", "--dir", str(tmp_path), "--time-limit", "60"],
                            cwd=REPO, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["messages"] == 300
    for run in ("start", "after_kill9"):
        assert 0 < summary[f"{run}_ready_seconds"] <= summary[f"{run}_loaded_seconds"]
        assert 0 < summary[f"{run}_ready_cpu_seconds"] <= summary[f"{run}_loaded_cpu_seconds"]
        assert summary[f"{run}_ready_seconds"] <= summary[f"{run}_first_stored_seconds"]
        assert summary[f"{run}_first_stored_seconds"] <= summary[f"{run}_first_deliver_seconds"]
        assert summary[f"{run}_rss_bytes"] > 0 and summary[f"{run}_peak_rss_bytes"] >= summary[f"{run}_rss_bytes"]
    assert summary["disk_bytes"] > 300 * 512
