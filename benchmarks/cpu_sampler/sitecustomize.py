"""A CPU-time sampler for every `mtacluster serve` process, loaded by Python at start through this directory on
PYTHONPATH (benchmarks/README.md, "CPU samples of every role").

With CPU_SAMPLES_DIR=DIR in the environment, a process whose arguments include `serve` samples its main
thread's stack on SIGPROF (ITIMER_PROF, every millisecond of the process's CPU time). Each sample is weighted by
the main thread's CPU time since the previous one (a C call that ran for 5 ms counts 5 ms, not one sample);
the CPU of the process's other threads (SQLite, ZeroMQ I/O, HTTP) is booked to "[other threads]". At exit it
writes DIR/ROLE-PID.folded (collapsed stacks with microseconds of CPU, for flamegraph tools or
`python -m benchmarks.cpu_samples`) and DIR/ROLE-PID.threads (CPU milliseconds of each thread, as last seen).
Stacks of imports and of building the role (before it serves) are kept; the summary leaves them out.
Without the variable, or in any other process, it does nothing. Failure modes: none that stop the process (a
file that cannot be written is skipped).
"""

from __future__ import annotations

import os
import sys

_DIR = os.environ.get("CPU_SAMPLES_DIR", "")

if _DIR and "serve" in sys.argv:
    import atexit
    import collections
    import signal
    import threading
    import time
    from types import FrameType

    _ROLE = sys.argv[sys.argv.index("serve") + 1] if sys.argv.index("serve") + 1 < len(sys.argv) else "process"
    _samples: collections.Counter[str] = collections.Counter()
    _threads: dict[str, tuple[str, int]] = {}
    _last = [time.thread_time(), time.process_time()]

    def _sample(signum: int, frame: FrameType | None) -> None:
        thread, process = time.thread_time(), time.process_time()
        own, everyone = thread - _last[0], process - _last[1]
        _last[0], _last[1] = thread, process
        if everyone > own:
            _samples["[other threads]"] += int((everyone - own) * 1e6)
        names = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})")
            frame = frame.f_back
        _samples[";".join(reversed(names))] += int(own * 1e6)

    def _watch_threads() -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while True:
            time.sleep(0.3)
            try:
                for tid in os.listdir("/proc/self/task"):
                    with open(f"/proc/self/task/{tid}/stat") as stat, open(f"/proc/self/task/{tid}/comm") as comm:
                        fields = stat.read().rsplit(")", 1)[1].split()
                        _threads[tid] = (comm.read().strip(), (int(fields[11]) + int(fields[12])) * 1000 // tick)
            except OSError:
                continue

    def _write() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        base = os.path.join(_DIR, f"{_ROLE}-{os.getpid()}")
        try:
            with open(base + ".folded", "w") as out:
                out.writelines(f"{stack} {micros}\n" for stack, micros in _samples.items() if micros)
            with open(base + ".threads", "w") as out:
                out.writelines(f"{tid} {name} cpu_ms={ms}\n" for tid, (name, ms) in sorted(_threads.items()))
        except OSError:
            pass

    signal.signal(signal.SIGPROF, _sample)
    signal.setitimer(signal.ITIMER_PROF, 0.001, 0.001)
    threading.Thread(target=_watch_threads, daemon=True, name="cpu-samples").start()
    atexit.register(_write)
