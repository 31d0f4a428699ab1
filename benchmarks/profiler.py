"""Optional profiling of the cluster's processes with py-spy while the benchmark runs.

`Profiler.start(pids)` runs one `py-spy record --nonblocking` per process (pid -> role), writing
`<dir>/<role>-<pid>.svg` (flamegraph) or `.txt` (collapsed stacks, format "raw"); `stop()` sends SIGINT so
py-spy writes its file, and waits. `top_frames(collapsed_text)` is pure: it turns collapsed stacks
("frame;frame;frame COUNT" per line) into the frames with the most samples, self and inclusive.

Failure modes: py-spy missing -> `find_py_spy()` returns None and the caller says so; py-spy failing to attach
to one process (permissions) is reported by `stop()` in the returned notes, and the benchmark goes on.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE = 100
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class FrameShare:
    frame: str
    self_samples: int
    inclusive_samples: int
    self_percent: float
    inclusive_percent: float


def find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def top_frames(collapsed: str, limit: int = 10) -> tuple[int, list[FrameShare]]:
    """(total samples, the `limit` frames with most self samples) from py-spy's raw/collapsed output."""
    self_counts: Counter[str] = Counter()
    inclusive_counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive_counts[frame] += count
    shares = [
        FrameShare(frame, samples, inclusive_counts[frame], 100.0 * samples / total,
                   100.0 * inclusive_counts[frame] / total)
        for frame, samples in self_counts.most_common(limit)
    ]
    return total, shares


class Profiler:
    def __init__(self, binary: str, directory: Path, output_format: str = "flamegraph") -> None:
        self.binary = binary
        self.directory = directory
        self.format = output_format
        self.recordings: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def output_path(self, role: str, pid: int) -> Path:
        suffix = "svg" if self.format == "flamegraph" else "txt" if self.format == "raw" else "json"
        return self.directory / f"{role}-{pid}.{suffix}"

    def start(self, pids: dict[int, str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for pid, role in sorted(pids.items(), key=lambda item: (item[1], item[0])):
            path = self.output_path(role, pid)
            command = [self.binary, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--nonblocking",
                       "--format", self.format, "--output", str(path)]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL)
            self.recordings.append((role, path, process))

    def stop(self) -> list[str]:
        """Stop every recording; notes about the ones that failed."""
        notes = []
        for _, _, process in self.recordings:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for role, path, process in self.recordings:
            try:
                _, stderr = process.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            if not path.exists():
                notes.append(f"{role}: no profile written: {stderr.decode(errors='replace').strip()[-300:]}")
        self.recordings.clear()
        return notes

    def written(self) -> list[Path]:
        return sorted(self.directory.glob("*-*.*"))
