"""The CPU sampler of benchmarks/cpu_sampler, loaded into a real process through PYTHONPATH as `make bench` runs
use it: a `serve` process writes its samples at exit, weighted by CPU time, where the work was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks import cpu_samples

SAMPLER = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_sampler"
BUSY = """
import time
def spin_here():
    end = time.process_time() + 0.3
    while time.process_time() < end:
        sum(range(1000))
spin_here()
"""


def run(tmp_path: Path, *argv: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(SAMPLER), "CPU_SAMPLES_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", BUSY, *argv], env=env, check=True, timeout=30)


def test_a_serve_process_writes_its_cpu_samples(tmp_path: Path) -> None:
    run(tmp_path, "serve", "queue")
    (folded,) = tmp_path.glob("queue-*.folded")
    assert list(tmp_path.glob("queue-*.threads"))
    total, _, inclusive = cpu_samples.summarise(folded.read_text().splitlines())
    assert 150_000 <= total <= 1_000_000  # about the 0.3 s of CPU the process spent, in microseconds
    assert inclusive["spin_here (<string>)"] >= 0.8 * total


def test_other_processes_are_left_alone(tmp_path: Path) -> None:
    run(tmp_path, "up")
    assert list(tmp_path.iterdir()) == []
