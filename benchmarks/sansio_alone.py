"""The sans-I/O machines alone, in one process: CPU per message of the SMTP server machine and of the bus codec.

    python -m benchmarks.sansio_alone [--messages 20000] [--size 4096] [--rounds 5]
    MTACLUSTER_PURE_PYTHON=1 python -m benchmarks.sansio_alone      # the same modules from their .py (A/B)

No sockets and no event loop: what compiling the hot modules with mypyc can change (cluster/compiled.py). Steps:
- `smtp`: one smtp-source conversation per message through `ServerConnection` (greeting, EHLO, MAIL, RCPT, DATA
  with a `--size` body of 80-octet lines, QUIT; each command fed as its own read, the decisions answered at once,
  the replies taken with `data_to_send()` after each read, as the frontend's session does);
- `bus`: the frames of one message on the bus: an Inject encoded (frontend) and decoded (shard), a Deliver
  encoded (shard) and decoded (worker), a Result encoded (worker) and decoded (shard).
Prints, per step, the best of `--rounds` (microseconds of `time.process_time` per message) and whether the
compiled modules ran, then a JSON line. Failure modes: none expected; a machine that answers out of script raises
AssertionError.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import cluster
from cluster.bus import schemas
from cluster.config import SmtpConfig
from cluster.smtp import replies
from cluster.smtp.events import MailRequested, MessageReceived, NeedData, Paused, RcptRequested, SessionEnded
from cluster.smtp.server import ServerConnection, ServerSettings

COMMANDS = (b"EHLO bench.example\r\n", b"MAIL FROM:<bench@bench.example>\r\n", b"RCPT TO:<sink@bench.example>\r\n",
            b"DATA\r\n")


def body(size: int) -> bytes:
    line = b"X" * 78 + b"\r\n"
    return b"Subject: bench\r\n\r\n" + line * max(size // len(line), 1) + b".\r\n"


def smtp_conversation(settings: ServerSettings, message: bytes) -> int:
    """One message as smtp-source sends it (no pipelining); returns the octets of replies (a check)."""
    connection = ServerConnection(settings)
    connection.start()
    sent = len(connection.data_to_send())
    for chunk in (*COMMANDS, message, b"QUIT\r\n"):
        connection.receive_data(chunk)
        while True:
            event = connection.next_event()
            if event is NeedData or event is Paused or isinstance(event, SessionEnded):
                break
            if isinstance(event, MailRequested):
                connection.respond(replies.SENDER_OK)
            elif isinstance(event, RcptRequested):
                connection.respond(replies.RECIPIENT_OK)
            elif isinstance(event, MessageReceived):
                connection.respond(replies.OK)
        sent += len(connection.data_to_send())
    assert connection.closed, "the conversation did not end with QUIT"
    return sent


def bus_frames(message: bytes) -> int:
    inject = schemas.Inject(req=7, sender="bench@bench.example", recipients=["sink@bench.example"], body=message,
                            client={"ip": "127.0.0.1", "helo": "bench.example"})
    decoded = schemas.decode(inject.encode())
    assert isinstance(decoded, schemas.Inject)
    deliver = schemas.Deliver(job_id="11", queue_id="0123456789abcdef", sender=decoded.sender,
                              recipients=list(decoded.recipients), body=decoded.body, domain="bench.example",
                              attempt=0, seq=5, epoch="e", incarnation=1)
    job = schemas.decode(deliver.encode())
    assert isinstance(job, schemas.Deliver)
    outcome = schemas.Outcome(recipient=job.recipients[0], kind=schemas.OutcomeKind.DELIVERED, code=250,
                              enhanced="2.0.0", text="ok", remote="127.0.0.1")
    result = schemas.decode(schemas.Result(job_id=job.job_id, worker="w1", outcomes=[outcome]).encode())
    assert isinstance(result, schemas.Result)
    return len(result.outcomes)


def best_microseconds(step: Callable[[], object], messages: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(messages):
            step()
        best = min(best, time.process_time() - started)
    return best / messages * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=4096, help="message size in octets")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    settings = ServerSettings.from_config(SmtpConfig(hostname="mx.bench.example"))
    message = body(args.size)
    figures = {
        "smtp": best_microseconds(lambda: smtp_conversation(settings, message), args.messages, args.rounds),
        "bus": best_microseconds(lambda: bus_frames(message), args.messages, args.rounds),
    }
    build = cluster.compiled.BUILD.describe()
    for name, microseconds in figures.items():
        print(f"{name}: {microseconds:.1f} us/message ({build})")
    print(json.dumps({"us_per_message": {name: round(value, 2) for name, value in figures.items()}, "build": build,
                      "messages": args.messages, "size": args.size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
