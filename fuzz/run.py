"""Run the fuzz targets one after another, each for a set time: `python -m fuzz.run [--seconds N] [TARGET...]`.

Each target runs in its own process (fuzz/engine.py; libFuzzer ends its process when it stops) with a fresh
temporary corpus plus the target's seeds in tests/fuzz_seeds/<target>/ (regression inputs included), a 10 s
limit per input (a longer one is a hang) and crashing inputs written into that seed folder. Prints one line per
target (inputs run, new seeds, result) and the total of inputs that ran without a finding; exits 1 if any
target found something, 2 if atheris is not installed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.targets import TARGETS, seed_dir

_DONE = re.compile(r"Done (\d+) runs in")
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def run_target(name: str, seconds: int) -> tuple[int, str | None]:
    """(inputs run, path of the crashing input or None)."""
    seeds = seed_dir(name)
    seeds.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as corpus:
        command = [sys.executable, "-m", "fuzz.engine", name, corpus, str(seeds), f"-max_total_time={seconds}",
                   "-timeout=10", "-max_len=4096", "-rss_limit_mb=1536", f"-artifact_prefix={seeds}/",
                   "-print_final_stats=1"]
        result = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                cwd=Path(__file__).resolve().parent.parent, timeout=seconds + 120)
    log = result.stderr + result.stdout
    done = _DONE.search(log)
    progress = _PROGRESS.findall(log)
    runs = int(done.group(1)) if done else int(progress[-1]) if progress else 0
    artifact = _ARTIFACT.search(log)
    if result.returncode != 0:
        sys.stderr.write(log[-6000:])
        return runs, artifact.group(1) if artifact else f"exit status {result.returncode}"
    return runs, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")))
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], default=[], metavar="TARGET")
    args = parser.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed (pip install -e '.[test]')", file=sys.stderr)
        return 2
    names = args.targets or list(TARGETS)
    clean_runs, findings = 0, []
    for name in names:
        started = time.monotonic()
        runs, finding = run_target(name, args.seconds)
        took = time.monotonic() - started
        if finding:
            findings.append(name)
            clean_runs += max(runs - 1, 0)
            print(f"fuzz {name}: FINDING after {runs} inputs ({took:.0f} s): {finding}")
        else:
            clean_runs += runs
            print(f"fuzz {name}: {runs} inputs, no finding ({took:.0f} s)")
    print(f"fuzz: {clean_runs} inputs ran without a finding over {len(names)} targets"
          + (f"; findings in {', '.join(findings)}" if findings else ""))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
