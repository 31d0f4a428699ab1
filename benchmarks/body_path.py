"""CPU per message of each step a big message body takes, in this process (no sockets, no other processes).

```
.venv/bin/python -m benchmarks.body_path                       # a 1 MiB message as smtp-source sends it
.venv/bin/python -m benchmarks.body_path --size 262144 --read 262144 --repeat 50
```

The message is smtp-source's: a few header fields, then lines of 78 octets + CRLF, `--size` octets in all.
Each step runs `--repeat` times (best of `--rounds`), timed with `time.process_time`:
- `data_reader`: the frontend's DATA reader (cluster/smtp/lines.py) fed the message in `--read`-octet reads
  (as the session receives it), up to its result;
- `chunk_reader`: the BDAT reader fed the same, as one chunk;
- `inject_encode` / `inject_decode`: the Inject bus frame of the body (cluster/bus/schemas.py);
- `dot_stuff`: the worker's wire form of the body (cluster/smtp/client.py);
- `spool_store_remove`: one SqliteSpool transaction storing the message (in batches of 6, as a busy shard's
  group commit does) and one removing it, fsyncs included, in a temporary directory on `--dir`'s file system.
Prints one line per step (milliseconds per message) and, last, a JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

from cluster.bus.schemas import Inject, decode
from cluster.queue.records import Message, Recipient
from cluster.queue.spool import Batch, SqliteSpool
from cluster.smtp.client import dot_stuff
from cluster.smtp.lines import ChunkReader, DataReader

HEADER = (b"From: <a@b.example>\r\nTo: <c@d.example>\r\nDate: Mon, 30 Nov 2026 01:18:06 +0000 (UTC)\r\n"
          b"Message-Id: <208f.0003.0000@vm>\r\n\r\n")
BATCH = 6


def message(size: int) -> bytes:
    """smtp-source's message of about `size` octets: header fields, then numbered lines of 78 octets + CRLF."""
    lines = [f"{n % 10}".encode() + b"X" * 77 + b"\r\n" for n in range(max(1, (size - len(HEADER)) // 80))]
    return HEADER + b"".join(lines)


def best_ms(step: Callable[[], object], repeat: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(repeat):
            step()
        best = min(best, (time.process_time() - started) / repeat)
    return best * 1000


def measure(size: int, read: int, repeat: int, rounds: int, directory: str | None) -> dict[str, float]:
    body = message(size)
    wire = body + b".\r\n"

    def data_reader() -> None:
        reader, buffer = DataReader(1000, 64 * 1024 * 1024), bytearray()
        for start in range(0, len(wire), read):
            buffer += wire[start:start + read]
            result = reader.feed(buffer)
        assert result is not None and result.data == body

    def chunk_reader() -> None:
        reader, buffer = ChunkReader(1000, 64 * 1024 * 1024), bytearray()
        reader.start_chunk(len(body), keep=True)
        for start in range(0, len(body), read):
            buffer += body[start:start + read]
            reader.feed(buffer)
        assert reader.result().data == body

    inject = Inject(req=1, sender="a@b.example", recipients=["c@d.example"], body=body, client={"ip": "192.0.2.1"})
    frame = inject.encode()
    figures = {
        "data_reader": best_ms(data_reader, repeat, rounds),
        "chunk_reader": best_ms(chunk_reader, repeat, rounds),
        "inject_encode": best_ms(inject.encode, repeat, rounds),
        "inject_decode": best_ms(lambda: decode(frame), repeat, rounds),
        "dot_stuff": best_ms(lambda: dot_stuff(body), repeat, rounds),
    }
    spool_dir = tempfile.mkdtemp(prefix="body-path-", dir=directory)
    spool = SqliteSpool(spool_dir)
    spool.open()
    numbers = iter(range(10**9))
    try:
        def store_and_remove() -> None:
            ids = [f"Q{next(numbers):09d}" for _ in range(BATCH)]
            spool.commit(Batch(stores=[Message(q, "a@b.example", 1.0, [Recipient(0, "c@d.example")], len(body), {})
                                       for q in ids], bodies=dict.fromkeys(ids, body)))
            spool.commit(Batch(removals=ids))

        figures["spool_store_remove"] = best_ms(store_and_remove, max(1, repeat // BATCH), rounds) / BATCH
    finally:
        spool.close()
        shutil.rmtree(spool_dir, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024 * 1024, help="message size in octets")
    parser.add_argument("--read", type=int, default=64 * 1024, help="octets per read fed to the readers")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the temporary spool goes (default: the temp dir)")
    args = parser.parse_args(argv)
    figures = measure(args.size, args.read, args.repeat, args.rounds, args.dir)
    for name, value in figures.items():
        print(f"{name:>20}: {value:.3f} ms per message")
    print(json.dumps({"size": args.size, "read": args.read, "ms_per_message": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
