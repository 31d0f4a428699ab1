"""Summary of the CPU samples `benchmarks/cpu_sampler` wrote: where each role's CPU time went.

    python -m benchmarks.cpu_samples DIR ROLE [--top N]

Reads DIR/ROLE-*.folded (every process of the role together), leaves out the stacks of imports and of building
the role before it serves, and prints the share of CPU time of the top N functions by self time (the innermost
frame) and by inclusive time (any frame of the stack; a function counted once per stack). Functions are named
"name (file)". Pure but for reading the files; a missing directory or role prints nothing to summarise.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterable
from pathlib import Path

# Stacks that belong to starting the process, not to its work.
STARTUP_FRAMES = ("_find_and_load", "build_service")


def function_of(frame: str) -> str:
    """'name (file.py:12)' -> 'name (file.py)'; '[other threads]' stays as it is."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rstrip(')')})" if where else name


def summarise(lines: Iterable[str]) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """(total microseconds, self time per function, inclusive time per function) of folded-stack lines."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, weight = line.rstrip("\n").rpartition(" ")
        if not stack or not weight.isdigit():
            continue
        frames = stack.split(";")
        if any(marker in frame for frame in frames for marker in STARTUP_FRAMES):
            continue
        micros = int(weight)
        total += micros
        own[function_of(frames[-1])] += micros
        for function in {function_of(frame) for frame in frames}:
            inclusive[function] += micros
    return total, own, inclusive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("role")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    lines = [line for path in sorted(args.directory.glob(f"{args.role}-*.folded")) for line in path.open()]
    total, own, inclusive = summarise(lines)
    if not total:
        print(f"no samples of {args.role} in {args.directory}")
        return 1
    print(f"{args.role}: {total / 1000:.0f} ms of CPU sampled")
    for title, counts in (("self", own), ("inclusive", inclusive)):
        print(f"--- {title}")
        for function, micros in counts.most_common(args.top):
            print(f"{100 * micros / total:5.1f} % {function}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
