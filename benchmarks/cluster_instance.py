"""The system under test: `mtacluster up --config FILE` as a subprocess, with a configuration written here.

`render_config(settings)` is pure: the TOML for one shard, `frontends` frontends sharing the SMTP port,
`workers` workers, all mail sent to the sink as smarthost, spool and maildir under the work directory, and for
the "signed" scenario a DKIM key for the sender's domain (every message is signed at acceptance).
`ClusterInstance.start()` writes it and starts the supervisor (its output goes to `<workdir>/cluster.log`);
`stop()` sends SIGTERM and waits (the supervisor stops its children in order), then SIGKILLs the whole
process group. `role_pids()` maps each child process to its role (read from /proc), for the profiler.

Failure modes: the command missing or exiting at once raises `ClusterError` with the tail of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

STOP_TIMEOUT = 25.0
_PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    """mtacluster could not be started or stopped."""


@dataclass(frozen=True)
class ClusterSettings:
    workdir: Path
    smtp_port: int
    shard_port: int
    metrics_port: int
    sink_port: int
    frontends: int = 2
    workers: int = 2
    hostname: str = "bench-ours.localdomain"
    host: str = "127.0.0.1"
    # The "signed" scenario: DKIM-sign mail from this domain with this key (rsa-sha256), or None.
    dkim_domain: str = ""
    dkim_key_file: Path | None = None
    dkim_algorithm: str = "rsa-sha256"

    @property
    def config_file(self) -> Path:
        return self.workdir / "mtacluster.toml"

    @property
    def log_file(self) -> Path:
        return self.workdir / "cluster.log"

    @property
    def processes(self) -> int:
        """Children of the supervisor, each with its own metrics port (base + index)."""
        return 1 + self.frontends + self.workers


def _toml_string(value: str) -> str:
    # JSON string syntax is valid TOML basic-string syntax for the characters used here.
    return json.dumps(value)


def render_config(settings: ClusterSettings) -> str:
    s = settings
    return "\n".join([
        "[smtp]",
        f"hostname = {_toml_string(s.hostname)}",
        f"listen = [{_toml_string(f'{s.host}:{s.smtp_port}')}]",
        "",
        "[queue]",
        f"shards = [{_toml_string(f'tcp://{s.host}:{s.shard_port}')}]",
        f"spool_dir = {_toml_string(str(s.workdir / 'spool'))}",
        "",
        "[delivery]",
        f"smarthost = {_toml_string(f'{s.host}:{s.sink_port}')}",
        "",
        "[mailbox]",
        f"maildir_root = {_toml_string(str(s.workdir / 'maildir'))}",
        "",
        "[metrics]",
        f"listen = {_toml_string(f'{s.host}:{s.metrics_port}')}",
        "",
        "[up]",
        f"frontends = {s.frontends}",
        f"workers = {s.workers}",
        "mailbox = false  # the same work as the Postfix side: SMTP in, SMTP out",
        "",
        *([f"[dkim.domains.{_toml_string(s.dkim_domain)}]", 'selector = "bench"',
           f"key_file = {_toml_string(str(s.dkim_key_file))}", f"algorithm = {_toml_string(s.dkim_algorithm)}", ""]
          if s.dkim_key_file is not None else []),
    ])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the benchmark dies, so nothing is left behind."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def mtacluster_command() -> list[str]:
    """The `mtacluster` next to this interpreter (the venv's), else `python -m cluster`."""
    script = Path(sys.executable).with_name("mtacluster")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cluster"]


class ClusterInstance:
    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        s = self.settings
        s.workdir.mkdir(parents=True, exist_ok=True)
        s.config_file.write_text(render_config(s))
        # Logging stays at the product's default level, as Postfix keeps its default logging: a fair comparison.
        with open(s.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [*mtacluster_command(), "up", "--config", str(s.config_file)], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)

    def check_running(self) -> None:
        if self.process is None:
            raise ClusterError("not started")
        if self.process.poll() is not None:
            raise ClusterError(f"mtacluster up exited with code {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.settings.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def role_pids(self) -> dict[int, str]:
        """pid -> role ("queue", "frontend", "worker") of every child of the supervisor."""
        if self.process is None:
            return {}
        return {pid: role for pid in _children(self.process.pid) if (role := _role_of(pid))}

    def stop(self) -> None:
        """SIGTERM the supervisor and wait; SIGKILL what is left. Idempotent."""
        process = self.process
        if process is None:
            return
        children = list(self.role_pids())
        stop_process(process, STOP_TIMEOUT)
        for pid in children:
            # Each child runs in a session of its own; a child that outlived the supervisor is killed here.
            with contextlib.suppress(ProcessLookupError):
                if _alive_child(pid):
                    os.kill(pid, signal.SIGKILL)
        self.process = None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def role_from_cmdline(argv: list[str]) -> str | None:
    """The role in "... -m cluster serve ROLE ..." or "mtacluster serve ROLE ..."; None otherwise."""
    for index, arg in enumerate(argv[:-1]):
        if arg == "serve":
            return argv[index + 1]
    return None


def _role_of(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return role_from_cmdline([part.decode(errors="replace") for part in raw.split(b"\0") if part])


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM `process` (when it still runs), wait up to `timeout` seconds, then SIGKILL it; reaped either way."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds_from_stat(stat: str, ticks_per_second: int, reaped_children: bool = False) -> float:
    """User + system CPU time from the text of /proc/PID/stat (proc(5): utime 14, stime 15, and with
    `reaped_children` also cutime 16 and cstime 17: the time of children that exited and were waited for)."""
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is field 3 (state), so field N is at index N - 3.
    used = int(fields[11]) + int(fields[12])
    if reaped_children:
        used += int(fields[13]) + int(fields[14])
    return used / ticks_per_second


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its descendants, those still running and those already reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    own = cpu_seconds_from_stat(stat, os.sysconf("SC_CLK_TCK"), reaped_children=True)
    return own + sum(tree_cpu_seconds(child) for child in _children(pid))


def cpu_by_role(pids: dict[int, str]) -> dict[str, float]:
    """CPU seconds used so far, summed per role, of the processes still running."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid, role in pids.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        totals[role] = totals.get(role, 0.0) + cpu_seconds_from_stat(stat, ticks)
    return totals


def _alive_child(pid: int) -> bool:
    """Whether pid is still a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"

