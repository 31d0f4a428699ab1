"""Traffic shaping end to end: 25 messages to a destination limited to 5/s arrive at that rate through a real
cluster, and none bounce; `mtacluster shaping status` shows the limit in force."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.harness import Cluster, SmtpSink, running

pytestmark = pytest.mark.integration

RATE = 5  # messages per second
COUNT = 25


def test_25_messages_at_5_per_second_none_bounce(tmp_path: Path) -> None:
    with running(SmtpSink()) as sink:
        cluster = Cluster(tmp_path / "c", overrides={
            "delivery": {"transports": {"slow.test": f"smtp:[127.0.0.1]:{sink.port}",
                                        "sender.test": f"smtp:[127.0.0.1]:{sink.port}"}},
            "shaping": {"slow.test": {"max_message_rate": f"{RATE}/s"}},
        })
        with running(cluster):
            with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=10) as client:
                started = time.time()
                for i in range(COUNT):
                    client.sendmail("me@sender.test", [f"r{i}@slow.test"], f"Subject: {i}\r\n\r\n{i}\r\n".encode())
            accepted = time.time()
            messages = sink.wait_for_messages(COUNT, timeout=30)
            arrivals = sorted(m.path.stat().st_mtime for m in messages)
            status = subprocess.run([sys.executable, "-m", "cluster", "shaping", "status", "--json", "--config",
                                     str(cluster.config_path)], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        (row,) = [r for r in json.loads(status.stdout) if r["destination"] == "slow.test"]
        assert row["max_message_rate"] == f"{RATE}/s" and row["entries"][-1] == "slow.test"
    assert len(messages) == COUNT and sorted(m.recipients[0] for m in messages) == sorted(
        f"r{i}@slow.test" for i in range(COUNT))
    assert all(m.sender == "me@sender.test" for m in messages)  # no bounce (a DSN has the null sender)
    first = arrivals[0]
    timeline = {"accepted all after": round(accepted - started, 2), "first arrival after": round(first - started, 2),
                "arrivals after the first": [round(a - first, 2) for a in arrivals]}
    # At most RATE start in any second: the k-th arrival is at least k // RATE seconds after the first (less
    # the spread of delivery times), so the whole batch takes (COUNT - 1) // RATE seconds at least.
    for k, arrived in enumerate(arrivals):
        assert arrived - first >= k // RATE - 0.35, (k, timeline)
    # Not held back more than the limit asks: the last arrives within 3 s of the later of its earliest allowed
    # start and its acceptance. Counting from the first arrival alone made the time the 25 accepts took (fsyncs
    # on a loaded machine, seconds) look like slow pacing; a limiter at half the rate still ends ~5 s late.
    allowed = max(first + (COUNT - 1) // RATE, accepted)
    assert arrivals[-1] - allowed < 3, timeline
