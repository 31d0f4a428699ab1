"""One role's process profiled on its own CPU time, for the role-alone harnesses (frontend_alone, worker_alone).

`run_profiled(serve, output)` calls `serve()` (the role's main; returns its exit status) under a profiler and
writes OUTPUT when it returns:
- OUTPUT ending in ".prof": cProfile on a CPU clock (`time.process_time`; pstats format, exact call counts, but
  its overhead about triples the CPU and inflates small functions);
- any other name: a sampler, SIGPROF after every millisecond of the process's CPU time (ITIMER_PROF), the
  Python stack of the main thread at each, written as collapsed stacks ("a (f.py:1);b (g.py:7) COUNT" lines,
  flamegraph.pl input). Time the process spends preempted is charged to nothing.
`summary(path)` prints the top functions of such a file by self and inclusive samples
(`benchmarks.cpu_samples.summarise`). The harness's CPU figure includes the profiler's overhead when it runs.
"""

from __future__ import annotations

import cProfile
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from benchmarks.cpu_samples import summarise

SAMPLE_INTERVAL = 0.001  # seconds of the process's CPU time between two samples


def run_profiled(serve: Callable[[], int], output: str) -> int:
    if output.endswith(".prof"):
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        try:
            return serve()
        finally:
            profiler.disable()
            profiler.dump_stats(output)
    stacks: Counter[str] = Counter()

    def sample(signum: int, frame: FrameType | None) -> None:
        names = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})")
            frame = frame.f_back
        stacks[";".join(reversed(names))] += 1

    signal.signal(signal.SIGPROF, sample)
    signal.setitimer(signal.ITIMER_PROF, SAMPLE_INTERVAL, SAMPLE_INTERVAL)
    try:
        return serve()
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        Path(output).write_text("".join(f"{stack} {count}\n" for stack, count in stacks.most_common()))


def summary(path: str, top: int = 40) -> str:
    """The functions with the most samples of their own (self) and in all (inclusive), from collapsed stacks."""
    samples, own, inclusive = summarise(Path(path).read_text().splitlines())
    lines = [f"{samples} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"--- top {top} by {title} ---")
        lines += [f"{100 * count / max(samples, 1):5.1f}%  {name}" for name, count in counter.most_common(top)]
    return "\n".join(lines)
