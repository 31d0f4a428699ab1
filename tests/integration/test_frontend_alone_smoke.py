"""benchmarks/frontend_alone.py, run tiny: the frontend-alone measurement keeps working (smtp-source against one
frontend and the stub shard), every message is accepted, and --source runs the code of the directory it names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.harness import REPO
from tests.support.tooling import require_tool

pytestmark = pytest.mark.integration


def test_frontend_alone_benchmark_runs_tiny() -> None:
    require_tool("smtp-source")
    result = subprocess.run([sys.executable, "-m", "benchmarks.frontend_alone", "--messages", "40", "--rounds", "2",
                             "--source", str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["accepted_logged"] == figures["expected"] == 200 + 2 * 40
    assert len(figures["cpu_ms_per_message"]) == 2 and figures["median"] > 0
    assert figures["cluster_from"] == str(REPO / "cluster")


def test_frontend_session_benchmark_runs_tiny() -> None:
    """benchmarks/frontend_session.py: sessions played in one process; every message answered 250 and stored."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.frontend_session", "--messages", "30", "--repeat", "2",
                             "--source", str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["stored"] == 200 + 2 * 30
    assert len(figures["us_per_message"]) == 2 and figures["best"] > 0
    assert figures["cluster_from"] == str(REPO / "cluster")
