"""A private Postfix instance for the benchmark: its own config, queue and log under a temporary directory.

`render_main_cf(...)` and `render_master_cf(original, port)` are pure: they produce the two configuration files
(the SMTP server on 127.0.0.1:PORT only, every service out of chroot, all mail relayed to the sink). The class
`PostfixInstance` writes them into `<workdir>/etc`, runs `postfix -c <workdir>/etc start`, and `stop()` runs
`postfix stop` and waits for the master process to exit (falling back to `postfix abort`, then SIGKILL).
The system-wide Postfix configuration is never touched. Postfix must run as root.

Failure modes: `start()` raises `PostfixError` with the tail of the instance's own mail log (Postfix reports
start errors only there when there is no tty).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SYSTEM_MASTER_CF = Path("/etc/postfix/master.cf")
POSTFIX_USER = "postfix"
STOP_TIMEOUT = 20.0


class PostfixError(RuntimeError):
    """The private Postfix instance could not be configured, started or stopped."""


@dataclass(frozen=True)
class PostfixSettings:
    workdir: Path
    smtp_port: int
    relay_port: int
    hostname: str = "bench-postfix.localdomain"
    host: str = "127.0.0.1"

    @property
    def config_dir(self) -> Path:
        return self.workdir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "queue"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def maillog(self) -> Path:
        return self.workdir / "maillog"


def render_main_cf(settings: PostfixSettings) -> str:
    """main.cf: Postfix defaults, except where the instance lives and where its mail goes."""
    lines = {
        "compatibility_level": "3.6",
        "myhostname": settings.hostname,
        # Nothing is local: every recipient is relayed to the sink.
        "mydestination": "",
        "local_recipient_maps": "",
        "mynetworks": "127.0.0.0/8",
        "inet_interfaces": settings.host,
        "inet_protocols": "ipv4",
        "relayhost": f"[{settings.host}]:{settings.relay_port}",
        "queue_directory": str(settings.queue_dir),
        "data_directory": str(settings.data_dir),
        "maillog_file": str(settings.maillog),
        "maillog_file_prefixes": str(settings.workdir.parent),
        "alias_maps": "",
        "alias_database": "",
        "smtputf8_enable": "no",
        # The sink is on loopback and offers no TLS; say so instead of probing.
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
    }
    return "".join(f"{key} = {value}\n" for key, value in lines.items())


def render_master_cf(original: str, port: int, host: str = "127.0.0.1") -> str:
    """The system master.cf with the `smtp inet` listener moved to host:port and chroot off everywhere.

    master.cf columns (master(5)): service type private unpriv chroot wakeup maxproc command + args.
    Continuation lines (leading white space) and comments are kept as they are.
    """
    out = []
    for line in original.splitlines():
        fields = line.split()
        if not fields or line[0] in "# \t" or len(fields) < 8:
            out.append(line)
            continue
        if fields[0] == "smtp" and fields[1] == "inet":
            fields[0] = f"{host}:{port}"
        fields[4] = "n"
        out.append(" ".join(fields))
    return "\n".join(out) + "\n"


class PostfixInstance:
    def __init__(self, settings: PostfixSettings, postfix_binary: str = "postfix") -> None:
        self.settings = settings
        self.postfix = postfix_binary
        self.started = False

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.postfix, "-c", str(self.settings.config_dir), *command],
                              capture_output=True, text=True, timeout=60, check=False)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.settings.maillog.read_text(errors="replace")
        except OSError:
            return "(no mail log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        if os.geteuid() != 0:
            raise PostfixError("the private Postfix instance must be started as root")
        s = self.settings
        for directory in (s.config_dir, s.queue_dir, s.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # Postfix daemons run as the postfix user: they must be able to reach their directories.
        for directory in (s.workdir.parent, s.workdir):
            directory.chmod(0o755)
        owner = pwd.getpwnam(POSTFIX_USER)
        os.chown(s.data_dir, owner.pw_uid, owner.pw_gid)
        (s.config_dir / "main.cf").write_text(render_main_cf(s))
        (s.config_dir / "master.cf").write_text(render_master_cf(SYSTEM_MASTER_CF.read_text(), s.smtp_port, s.host))
        result = self._run("start")
        if result.returncode != 0:
            fatal = [line for line in self.log_tail(50).splitlines() if "fatal:" in line]
            why = fatal[0].split("fatal:", 1)[1].strip() if fatal else result.stderr.strip()
            raise PostfixError(f"postfix start failed ({result.returncode}): {why}\n{self.log_tail()}")
        self.started = True

    def master_pid(self) -> int | None:
        try:
            text = (self.settings.queue_dir / "pid" / "master.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def stop(self) -> None:
        """Stop the instance and wait for its master to exit; idempotent."""
        if not self.started:
            return
        pid = self.master_pid()
        self._run("stop")
        if pid is not None and not _wait_exit(pid, STOP_TIMEOUT):
            self._run("abort")
            if not _wait_exit(pid, 5.0):
                os.kill(pid, signal.SIGKILL)
        self.started = False

    def remove_files(self) -> None:
        shutil.rmtree(self.settings.workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)
