"""Real processes for integration tests: smtp-sink peers, dnsmasq, and mtacluster roles.

Every helper waits for a condition with a deadline (never a fixed sleep) and cleans up after itself.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO
from tests.support.tooling import free_port, require_tool


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class SinkMessage:
    """One message as smtp-sink dumped it: envelope and the message text (LF line ends, as dumped)."""

    sender: str
    recipients: list[str]
    text: str
    path: Path

    @property
    def message_id(self) -> str | None:
        m = re.search(r"^Message-ID:\s*(\S+)", self.text, re.IGNORECASE | re.MULTILINE)
        return m.group(1) if m else None

    def without_trace_headers(self) -> str:
        """The message text after the leading Received headers (ours and the sink's)."""
        lines = self.text.split("\n")
        index = 0
        while index < len(lines) and (lines[index].startswith("Received:") or lines[index].startswith("\t")):
            index += 1
        return "\n".join(lines[index:])


class SmtpSink:
    """Postfix's smtp-sink on host:port, dumping every transaction to its own file."""

    def __init__(self, directory: Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                 options: list[str] | None = None) -> None:
        self.binary = require_tool("smtp-sink")
        self.host = host
        self.port = port or free_port(host)
        # smtp-sink writes as "nobody", who cannot enter pytest's private (0700) temporary directories: the dump
        # directory lives in the system temporary directory instead, and is removed by stop().
        del directory
        self.dump_dir = Path(tempfile.mkdtemp(prefix="mtacluster-sink-"))
        self.dump_dir.chmod(0o755)
        nobody = pwd.getpwnam("nobody")
        os.chown(self.dump_dir, nobody.pw_uid, nobody.pw_gid)
        self.options = options or []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        self.process = subprocess.Popen(
            [self.binary, "-u", "nobody", "-d", f"{self.dump_dir}/%Y%m%d%H%M%S.", *self.options,
             f"{self.host}:{self.port}", "256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.host, self.port), 10, f"smtp-sink on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)
        shutil.rmtree(self.dump_dir, ignore_errors=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def messages(self) -> list[SinkMessage]:
        found = []
        for path in sorted(self.dump_dir.iterdir()):
            raw = path.read_bytes().decode("latin-1")  # byte-exact: every byte maps to one char
            # The dump ends with an empty line; a file still being written has not got it yet.
            if not raw.endswith("\n\n"):
                continue
            header, _, rest = raw.partition("\nReceived: from ")
            sender = ""
            recipients = []
            for line in header.split("\n"):
                if line.startswith("X-Mail-Args: "):
                    sender = line.split(" ", 1)[1].split(" ")[0].strip("<>")
                elif line.startswith("X-Rcpt-Args: "):
                    recipients.append(line.split(" ", 1)[1].split(" ")[0].strip("<>"))
            # Drop the rest of the sink's own three-line Received header.
            text = rest.split("\n", 3)[3] if rest.count("\n") >= 3 else ""
            found.append(SinkMessage(sender, recipients, text[:-1], path))
        return found

    def wait_for_messages(self, count: int, timeout: float = 30) -> list[SinkMessage]:
        wait_for(lambda: len(self.messages()) >= count, timeout,
                 f"{count} messages at smtp-sink {self.address} (have {len(self.messages())})", interval=0.1)
        return self.messages()


class DnsServer:
    """dnsmasq answering for a test zone under ".test" on a free loopback port.

    `mx`: (domain, host, preference) records; `hosts`: name -> address (A records); names under .test that are
    not defined answer NXDOMAIN. `txt`: name -> the strings of its TXT record (each at most 255 bytes; DKIM keys
    span several). Always defined: null MX (RFC 7505) for nullmx.test, and SERVFAIL for servfail.test
    (forwarded to a port where nobody answers).
    """

    def __init__(self, mx: list[tuple[str, str, int]], hosts: dict[str, str],
                 txt: dict[str, list[str]] | None = None) -> None:
        self.binary = require_tool("dnsmasq")
        self.port = free_port()
        self.mx = mx
        self.hosts = hosts
        self.txt = txt or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        args = [self.binary, "--keep-in-foreground", f"--port={self.port}", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--no-resolv", "--no-hosts", "--user=root", "--local=/test/",
                "--dns-rr=nullmx.test,15,000000", "--server=/servfail.test/127.0.0.1#9", "--log-facility=-",
                "--host-record=ready.test,127.0.0.1"]
        args += [f"--mx-host={domain},{host},{preference}" for domain, host, preference in self.mx]
        args += [f"--host-record={name},{address}" for name, address in self.hosts.items()]
        # One argv element each, without shell quotes (they would become part of the record).
        args += [f"--txt-record={name},{','.join(strings)}" for name, strings in self.txt.items()]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 10, f"dnsmasq on {self.address} to answer")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"dnsmasq exited with {self.process.returncode}")
        query = dns.message.make_query("ready.test", "A")
        try:
            answer = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
        except (dns.exception.Timeout, OSError):
            return False
        return bool(answer.answer)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)


@dataclass
class RoleProcess:
    role: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    # Environment overrides for this process only (MTACLUSTER_<SECTION>_<KEY>), e.g. its own metrics port.
    env: dict[str, str] = field(default_factory=dict)
    # Command prefix, e.g. ["ip", "netns", "exec", "NS"] to run the role in a network namespace.
    wrapper: list[str] = field(default_factory=list)

    def start(self) -> RoleProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([*self.wrapper, sys.executable, "-m", "cluster", *self.args], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **self.env})
        return self

    @property
    def metrics_address(self) -> str:
        """host:port of this process's /metrics listener (started by a Cluster with metrics=True)."""
        address = self.env.get("MTACLUSTER_METRICS_LISTEN", "")
        assert address, f"{self.role} was started without a metrics listener"
        return address

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one series scraped from this process's /metrics (0 when it is absent)."""
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 40) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.role} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            return self.log().count("mtacluster: ready") > getattr(self, "_ready_seen", 0)

        try:
            wait_for(ready, timeout, f"{self.role} to be ready")
        except AssertionError as exc:  # the log as it is when the wait gave up, not as it was when it began
            raise AssertionError(f"{exc}; log:\n{self.log()[-2000:]}") from None
        self._ready_seen = self.log().count("mtacluster: ready")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)

    def stop(self, timeout: float = 20) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"{self.role} did not stop within {timeout}s after SIGTERM") from None


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        # A key such as "gmail.com" ([shaping]) is quoted, or TOML reads it as a dotted key.
        lines.extend(f"{key if re.fullmatch(r'[A-Za-z0-9_-]+', key) else toml_value(key)} = {toml_value(value)}"
                     for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class Cluster:
    """Queue shards, workers and frontends started one by one with `mtacluster serve` (so tests can kill one)."""

    directory: Path
    shards: int = 1
    frontends: int = 1
    workers: int = 1
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    smtp_port: int = 0
    # Give every process its own /metrics listener on a free port (RoleProcess.metric reads it).
    metrics: bool = False
    processes: list[RoleProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.smtp_port = self.smtp_port or free_port()
        shard_ports = [free_port() for _ in range(self.shards)]
        sections: dict[str, dict[str, Any]] = {
            "smtp": {"hostname": "mta.test", "listen": [f"127.0.0.1:{self.smtp_port}"],
                     "local_domains": ["local.test"]},
            "queue": {"shards": [f"tcp://127.0.0.1:{p}" for p in shard_ports],
                      "spool_dir": str(self.directory / "spool"), "heartbeat_interval": 0.2,
                      # Generous: on a loaded 2-core machine a busy worker must not be taken for a dead one
                      # (its jobs would be delivered twice), yet a killed worker is noticed within seconds.
                      "worker_timeout": 5},
            "delivery": {},
            "metrics": {"listen": ""},
        }
        for section, values in self.overrides.items():
            sections.setdefault(section, {}).update(values)
        self.sections = sections
        self.config_path = write_config(self.directory / "mtacluster.toml", sections)

    def role(self, role: str, *extra: str) -> RoleProcess:
        name = f"{role}{''.join(extra).replace('--shard', '')}-{len(self.processes)}"
        env = {"MTACLUSTER_METRICS_LISTEN": f"127.0.0.1:{free_port()}"} if self.metrics else {}
        process = RoleProcess(role, ["serve", role, "--config", str(self.config_path), *extra],
                              self.directory / f"{name}.log", env=env)
        self.processes.append(process)
        return process

    def start(self) -> Cluster:
        started = [self.role("queue", "--shard", str(i)).start() for i in range(self.shards)]
        started += [self.role("worker").start() for _ in range(self.workers)]
        started += [self.role("frontend").start() for _ in range(self.frontends)]
        try:
            for process in started:
                process.wait_ready()
        except BaseException:
            self.stop()  # a cluster that never came up leaves no process behind for the next test
            raise
        return self

    def shard_process(self, index: int) -> RoleProcess:
        return [p for p in self.processes if p.role == "queue"][index]

    def stop(self) -> None:
        for role in ("frontend", "mailbox", "worker", "queue"):
            for process in self.processes:
                if process.role == role:
                    with contextlib.suppress(AssertionError):
                        process.stop()

    def logs(self) -> str:
        return "\n".join(f"==== {p.log_path.name}\n{p.log()[-4000:]}" for p in self.processes)


@contextlib.contextmanager
def running(thing: Any) -> Iterator[Any]:
    try:
        yield thing.start()
    finally:
        thing.stop()
