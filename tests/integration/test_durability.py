"""Contract 1 and 2 under a crash: kill -9 the queue shard while 2,000 messages are being injected.

Every message that got a 250 must reach the sink (counted by Message-ID); messages that got a 4xx or a broken
connection may be retried by the client and are not counted. Duplicates are allowed (in flight at the crash).
One message in BIG_EVERY is big enough for its body to be kept in a file beside its row (spool.py).
"""

from __future__ import annotations

import random
import smtplib
import threading
from pathlib import Path

import pytest

from cluster.queue.spool import BODY_FILE_MIN
from tests.support.harness import Cluster, SmtpSink, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = 2000
THREADS = 8
BIG_EVERY = 20
BIG_LINES = BODY_FILE_MIN // 64 + 64


def test_kill_9_of_the_shard_loses_no_accepted_message(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    cluster = Cluster(tmp_path / "cluster", shards=1, frontends=1, workers=1,
                      overrides={"delivery": {"smarthost": sink.address}, "smtp": {"inject_timeout": 3}})
    accepted: set[str] = set()
    refused = 0
    lock = threading.Lock()
    progress = threading.Event()
    kill_after = random.randint(200, 1200)
    try:
        cluster.start()

        def client(thread: int) -> None:
            nonlocal refused
            connection: smtplib.SMTP | None = None
            for i in range(thread, MESSAGES, THREADS):
                message_id = f"<durable.{i}@sender.test>"
                # Every BIG_EVERY-th body is big enough to be kept in a file of its own beside its row (spool.py).
                lines = BIG_LINES if i % BIG_EVERY == 0 else 16
                body = f"Message-ID: {message_id}\r\nSubject: {i}\r\n\r\n".encode() + (b"x" * 62 + b"\r\n") * lines
                try:
                    if connection is None:
                        connection = smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=30)
                    connection.sendmail("load@sender.test", [f"r{i}@durable.test"], body)
                except (smtplib.SMTPException, OSError):
                    with lock:
                        refused += 1
                    if connection is not None:
                        try:
                            connection.close()
                        finally:
                            connection = None
                    continue
                with lock:
                    accepted.add(message_id)
                    if len(accepted) >= kill_after:
                        progress.set()
            if connection is not None:
                connection.quit()

        threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        assert progress.wait(120), "the clients made no progress"
        shard = cluster.shard_process(0)
        shard.kill9()
        shard.start()
        shard.wait_ready()
        for thread in threads:
            thread.join(300)
        assert len(accepted) > kill_after

        def delivered_ids() -> set[str]:
            return {m.message_id for m in sink.messages() if m.message_id}

        wait_for(lambda: accepted <= delivered_ids(), 120,
                 f"all {len(accepted)} accepted messages at the sink", interval=0.5)
        missing = accepted - delivered_ids()
        assert not missing, f"{len(missing)} accepted messages lost: {sorted(missing)[:5]}\n{cluster.logs()}"
        print(f"accepted={len(accepted)} refused_or_failed={refused} killed_after={kill_after} "
              f"deliveries={len(sink.messages())}")
    finally:
        cluster.stop()
        sink.stop()
