"""Helpers for fault trials: SMTP load that records what was accepted, counting at a sink by Message-ID, and
network namespaces joined by veth pairs that a test can cut.

`Load` sends one-recipient messages from several threads, each with a unique Message-ID; `accepted` holds the
ids that got 250 (contract 1: those must arrive). `Tally` compares that with what smtp-sink dumped. `Netns`
creates namespaces and veth links (`ip netns`, `ip link`; needs root and iproute2) and removes them again on
exit, also after a failure.
"""

from __future__ import annotations

import contextlib
import smtplib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.support.harness import SmtpSink, wait_for


class Load:
    """SMTP clients sending until stopped; `accepted` are the Message-IDs answered 250."""

    def __init__(self, host: str, port: int, prefix: str, threads: int = 4, size: int = 1024,
                 pause: float = 0.0) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.size = size
        # Seconds each client waits between messages: shapes the load (a long trial need not pile up a backlog).
        self.pause = pause
        self.accepted: set[str] = set()
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(t,), daemon=True) for t in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive(), "an SMTP client did not finish within 60 s"

    def wait_accepted(self, count: int, timeout: float = 60) -> None:
        wait_for(lambda: len(self.accepted) >= count, timeout, f"{count} accepted messages (have "
                 f"{len(self.accepted)}, {self.failed} failed)")

    def _client(self, thread: int) -> None:
        connection: smtplib.SMTP | None = None
        i = 0
        while not self._stop.is_set():
            i += 1
            message_id = f"<{self.prefix}.{thread}.{i}@faults.test>"
            body = (f"Message-ID: {message_id}\r\nSubject: {i}\r\n\r\n".encode()
                    + (b"x" * 62 + b"\r\n") * max(1, self.size // 64))
            try:
                if connection is None:
                    connection = smtplib.SMTP(self.host, self.port, timeout=30)
                connection.sendmail("load@sender.test", [f"r{i}@d{i % 5}.faults.test"], body)
            except (smtplib.SMTPException, OSError):
                with self._lock:
                    self.failed += 1
                if connection is not None:
                    with contextlib.suppress(smtplib.SMTPException, OSError):
                        connection.close()
                    connection = None
                time.sleep(0.05)  # pacing a reconnect, not synchronisation
                continue
            with self._lock:
                self.accepted.add(message_id)
            self._stop.wait(self.pause)
        if connection is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                connection.quit()


@dataclass
class Tally:
    """Deliveries at a sink against the accepted Message-IDs."""

    accepted: set[str]
    delivered: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, sink: SmtpSink, accepted: set[str]) -> Tally:
        return cls(set(accepted), Counter(m.message_id for m in sink.messages() if m.message_id))

    @property
    def missing(self) -> set[str]:
        return self.accepted - set(self.delivered)

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.delivered.values())


def wait_delivered(sink: SmtpSink, accepted: set[str], timeout: float) -> tuple[Tally, float]:
    """Wait until every accepted message is at the sink; returns the tally and the seconds it took."""
    started = time.monotonic()
    wait_for(lambda: not Tally.of(sink, accepted).missing, timeout,
             f"all {len(accepted)} accepted messages at the sink", interval=0.2)
    return Tally.of(sink, accepted), time.monotonic() - started


def ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr.strip()}"


@dataclass
class Netns:
    """Network namespaces and veth links made by one test (names carry `tag`), removed on exit."""

    tag: str
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def namespace(self, name: str) -> str:
        full = f"{self.tag}{name}"
        ip("netns", "add", full)
        self.namespaces.append(full)
        ip("link", "set", "lo", "up", namespace=full)
        return full

    def link(self, a: str | None, a_name: str, a_address: str, b: str | None, b_name: str, b_address: str) -> None:
        """A veth pair: end `a_name` in namespace `a` (None: this one) with `a_address` (CIDR), same for b."""
        a_name, b_name = f"{self.tag}{a_name}", f"{self.tag}{b_name}"
        ip("link", "add", a_name, "type", "veth", "peer", "name", b_name)
        self.links.append(a_name)
        for namespace, name, address in ((a, a_name, a_address), (b, b_name, b_address)):
            if namespace is not None:
                ip("link", "set", name, "netns", namespace)
            ip("addr", "add", address, "dev", name, namespace=namespace)
            ip("link", "set", name, "up", namespace=namespace)

    def set_link(self, namespace: str | None, name: str, up: bool) -> None:
        ip("link", "set", f"{self.tag}{name}", "up" if up else "down", namespace=namespace)

    def close(self) -> None:
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


@contextlib.contextmanager
def netns(tag: str) -> Iterator[Netns]:
    made = Netns(tag)
    try:
        yield made
    finally:
        made.close()
