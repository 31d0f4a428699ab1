"""The journal of the Transfers a shard received: what makes a resend harmless, and when it may be forgotten.

A shard stores a Transfer (cluster/queue/drain.py `receive`) under the key "<queue id>#<hops>", then appends
"<key> <received at>" to the file `transfers-received` in its spool directory (fsynced) before answering
Stored. A Transfer whose key is in the journal is answered Stored without storing it again: its sender did not
see the first answer (it crashed, or the answer was lost) and sent it again.

Trimming rule (issue 14). A sender sends a Transfer again only while the entry is in its outbox, and deletes
the entry (committed) as soon as it has the Stored; it never sends that key again after that. So a key may be
forgotten
- at once when its sender confirms it deleted the entry: the outbox sends `transfers_confirmed` with the keys
  it removed (batched, best effort; cluster/queue/outbox.py);
- otherwise `ttl` seconds after it was received (the shard passes `queue.max_lifetime`): the confirmation was
  lost, or the sender crashed between our Stored and its deletion and comes back later. Only a sender that
  stays down longer than that, holding an entry this shard already stored, could have it stored a second
  time; its messages would have been bounced as expired by then anyway.
`trim(now)` drops both kinds from memory and rewrites the file (temporary file, fsync, rename) when anything
was dropped; a crash before the rewrite only keeps keys longer. Lines from before the timestamps (a bare key)
count as received at load time.

Inputs: the spool directory (None: memory only, for unit tests), the ttl. Outputs: membership, the file, its
size (`len`). Failure modes: an unreadable journal raises OSError at load (the shard does not start: it could
not tell resends from new transfers); a write error raises OSError to the caller (receive answers 451 and the
sender asks again; a failed trim is logged and tried again at the next one).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

JOURNAL_FILE = "transfers-received"


class TransferJournal:
    def __init__(self, directory: Path | None, ttl: float) -> None:
        self.directory = directory
        self.ttl = ttl
        self._received: dict[str, float] = {}
        self._confirmed: set[str] = set()
        # Appends (receive) and rewrites (trim) run in worker threads: one at a time.
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / JOURNAL_FILE

    def load(self, now: float | None = None) -> None:
        loaded_at = time.time() if now is None else now
        if self.path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            for line in self.path.read_text().splitlines():
                key, _, at = line.partition(" ")
                if not key:
                    continue
                try:
                    self._received[key] = float(at) if at else loaded_at
                except ValueError:
                    self._received[key] = loaded_at

    def __contains__(self, key: str) -> bool:
        return key in self._received

    def __len__(self) -> int:
        return len(self._received)

    def add(self, key: str, now: float) -> None:
        """Record a stored Transfer durably (blocking: call in a thread), then in memory."""
        with self._lock:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as file:
                    file.write(f"{key} {now:.3f}\n")
                    file.flush()
                    os.fsync(file.fileno())
            self._received[key] = now

    def confirm(self, keys: Iterable[str]) -> int:
        """The sender deleted these entries: they may be forgotten at the next trim. Returns how many we hold."""
        with self._lock:
            held = [key for key in keys if key in self._received]
            self._confirmed.update(held)
        return len(held)

    def due(self, now: float) -> bool:
        """Whether a trim would drop anything."""
        with self._lock:
            return bool(self._confirmed) or any(at <= now - self.ttl for at in self._received.values())

    def trim(self, now: float) -> int:
        """Forget the confirmed keys and those older than the ttl; rewrite the file. Blocking: call in a thread."""
        with self._lock:
            confirmed, self._confirmed = self._confirmed, set()
            dropped = {key for key, at in self._received.items() if key in confirmed or at <= now - self.ttl}
            if not dropped:
                return 0
            kept = {key: at for key, at in self._received.items() if key not in dropped}
            if self.path is not None:
                temporary = self.path.with_name(f"{JOURNAL_FILE}.tmp")
                try:
                    with open(temporary, "w") as file:
                        file.writelines(f"{key} {at:.3f}\n" for key, at in kept.items())
                        file.flush()
                        os.fsync(file.fileno())
                    os.replace(temporary, self.path)
                    descriptor = os.open(self.path.parent, os.O_RDONLY)
                    try:
                        os.fsync(descriptor)
                    finally:
                        os.close(descriptor)
                except OSError:
                    self._confirmed |= confirmed
                    raise
            # A key received meanwhile waits for the lock, and is appended to the new file.
            self._received = kept
            return len(dropped)
