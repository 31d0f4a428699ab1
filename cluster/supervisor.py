"""`mtacluster up`: run the whole cluster on one machine as child processes, and watch them.

Starts every queue shard of `queue.shards`, `up.frontends` frontends (sharing the SMTP port with SO_REUSEPORT),
`up.workers` workers (for 0, counts scaled to the CPUs: `config.up_processes`) and one mailbox process (when
`up.mailbox`), each as `python -m cluster serve ROLE`. Each child
gets its own metrics port: the port of `metrics.listen` plus the child's index. A child that exits unexpectedly
is restarted after `up.restart_delay`. SIGTERM or SIGINT stops the frontends first (no new mail), then the shards,
then the workers, then the mailbox: a stopping shard dispatches nothing more and waits (bounded) for the Results
of the jobs in flight while the workers (and the mailbox their local deliveries go to) are still running, so no
recipient is left marked in flight; the mailbox is stopped last, with nothing left to receive. A child still
running after the grace period is killed.
Children are tied to this process with PR_SET_PDEATHSIG, so even a kill -9 of the supervisor leaves no orphans.

Before starting anything, `up` makes sure it is alone: it takes an exclusive lock on `<queue.spool_dir>/up.lock`
(holding its pid) and checks that no other process listens on its SMTP addresses or shard endpoints. A second
`up` on the same configuration would otherwise share the SMTP port (SO_REUSEPORT) with frontends whose shards
cannot start, and restart them forever; instead it exits at once with code 1 and says who holds what.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config import Config, split_host_port, up_processes

GRACE_SECONDS = 15.0
# Shards stop before workers: they stop dispatching and collect the Results of the jobs in flight first; the
# mailbox stops last so that local (LMTP) deliveries in flight can finish.
STOP_ORDER = ("frontend", "queue", "worker", "mailbox")
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    role: str
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)


def _die_with_parent() -> None:
    """Runs in the child before exec: deliver SIGTERM to it when the supervisor dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: children then outlive a kill -9 of the supervisor, as with any process tree


def plan_children(config: Config, config_path: str | None) -> list[Child]:
    """The processes `up` runs, in start order: shards, workers, mailbox (when `up.mailbox`), frontends."""
    base = [sys.executable, "-m", "cluster", "serve"]
    config_args = ["--config", config_path] if config_path else []
    metrics_host, metrics_port = split_host_port(config.metrics.listen) if config.metrics.listen else ("", 0)
    children: list[Child] = []

    def add(role: str, extra: list[str]) -> None:
        env = dict(os.environ)
        if config.metrics.listen:
            env["MTACLUSTER_METRICS_LISTEN"] = f'"{metrics_host}:{metrics_port + len(children)}"'
        children.append(Child(role, [*base, role, *config_args, *extra], env))

    for index in range(len(config.queue.shards)):
        add("queue", ["--shard", str(index)])
    frontends, workers = up_processes(config.up)
    for _ in range(workers):
        add("worker", [])
    if config.up.mailbox:
        add("mailbox", [])
    for _ in range(frontends):
        add("frontend", [])
    return children


class Supervisor:
    def __init__(self, config: Config, config_path: str | None) -> None:
        self.config = config
        self.children = plan_children(config, config_path)
        self.stopping = False
        self._lock: int | None = None

    def _start(self, child: Child) -> None:
        # A session of its own: Ctrl-C at the terminal reaches only the supervisor, which stops children in order.
        child.process = subprocess.Popen(child.args, env=child.env, preexec_fn=_die_with_parent,
                                         start_new_session=True)
        child.started_at = time.monotonic()

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def claim(self) -> str:
        """Take this configuration for this process: "" when done, else why not (nothing was started)."""
        lock_path = Path(self.config.queue.spool_dir) / "up.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            return f"cannot create the lock file {lock_path}: {exc.strerror or exc}"
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(descriptor)
            return (f"another `mtacluster up` (pid {holder}) is running with the spool directory "
                    f"{self.config.queue.spool_dir} (lock {lock_path}); stop it first")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._lock = descriptor
        for what, address in self._addresses():
            problem = _address_in_use(address)
            if problem:
                self.release()
                return f"{what} {address} is already in use by another process ({problem}); stop it first"
        return ""

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _addresses(self) -> list[tuple[str, str]]:
        smtp = self.config.smtp
        found = [("SMTP address", a) for a in (*smtp.listen, *smtp.submission_listen, *smtp.submissions_listen)]
        found += [("shard endpoint", e.removeprefix("tcp://")) for e in self.config.queue.shards
                  if e.startswith("tcp://")]
        return found

    def run(self) -> int:
        problem = self.claim()
        if problem:
            print(f"mtacluster up: {problem}", file=sys.stderr, flush=True)
            return 1
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        for child in self.children:
            self._start(child)
        submission = self.config.smtp.submission_listen + self.config.smtp.submissions_listen
        frontends, workers = up_processes(self.config.up)
        print(f"mtacluster up: pid={os.getpid()} {len(self.children)} processes "
              f"(shards={len(self.config.queue.shards)} workers={workers} "
              f"frontends={frontends} mailbox={int(self.config.up.mailbox)}); "
              f"SMTP on {', '.join(self.config.smtp.listen) or 'nothing'}; "
              f"submission on {', '.join(submission) or 'nothing'}; "
              f"spool under {self.config.queue.spool_dir}; Ctrl-C stops", flush=True)
        while not self.stopping:
            self._restart_exited()
            time.sleep(0.2)
        return self._shutdown()

    def _restart_exited(self) -> None:
        for child in self.children:
            assert child.process is not None
            code = child.process.poll()
            if code is None or self.stopping:
                continue
            if time.monotonic() - child.started_at < self.config.up.restart_delay:
                continue
            child.restarts += 1
            print(f"mtacluster up: {child.role} pid={child.process.pid} exited with {code}; restarting "
                  f"(restart #{child.restarts})", file=sys.stderr, flush=True)
            self._start(child)

    def _shutdown(self) -> int:
        print("mtacluster up: stopping (frontends, then shards, then workers)", flush=True)
        for role in STOP_ORDER:
            group = [c.process for c in self.children if c.role == role and c.process is not None]
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            # Frontends serve their sessions for smtp.shutdown_grace first (cluster/frontend/server.py).
            grace = GRACE_SECONDS + (float(self.config.smtp.shutdown_grace) if role == "frontend" else 0.0)
            deadline = time.monotonic() + grace
            for process in group:
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"mtacluster up: {role} pid={process.pid} did not stop in {grace:g}s; killing",
                          file=sys.stderr, flush=True)
                    process.kill()
                    process.wait()
        print("mtacluster up: stopped", flush=True)
        return 0


def _address_in_use(address: str) -> str:
    """Why `host:port` cannot be listened on by us (another process listens there), or "" when it is free.

    Bound without SO_REUSEPORT: a socket of another process that uses it (a frontend) still refuses us."""
    try:
        host, port = split_host_port(address)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError):
        return ""  # a name that does not resolve here is the role's own startup error to report
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno == errno.EADDRINUSE else ""
    return ""
