"""A spool in memory: the second implementation of the `Spool` interface (spool.py), for tests.

It keeps what a committed transaction holds and nothing else, so a shard built on it behaves like one on SQLite
minus the disk: `load()` after `close()`/`open()` returns what was committed (a restart), as new objects that share
nothing with the caller's. Failure injection: `fail_commits(n, disk_full)` makes the next n commits raise
SpoolError without changing anything (as a failed SQLite transaction rolls back); `hold_commits()` makes the
durability step wait (`sync`, in the spool's thread) until `release_commits()`, to let a test order concurrent
transactions (what `write` applied shows meanwhile, as in SQLite's log); `free_bytes` is what `free_space()`
reports; `damage(queue_id)` makes the record fail its checks when its body is read (as a checksum mismatch does in
spool.py). Not durable across processes: never used by `serve`.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable

from cluster.queue.records import Message, RecipientUpdate, State
from cluster.queue.spool import Batch, Bodies, LoadResult, Quarantined, SpoolError
from cluster.queue.usage import UsageEntry


class MemorySpool:
    def __init__(self, free_bytes: int = 1 << 40) -> None:
        self.free_bytes = free_bytes
        self.commits = 0
        self._messages: dict[str, Message] = {}
        self._bodies: dict[str, bytes] = {}
        self._usage: dict[str, UsageEntry] = {}
        self.backoffs: dict[str, float] = {}
        self._damaged: set[str] = set()
        # queue id -> reason, of the records moved aside
        self.quarantined: dict[str, str] = {}
        self._open = False
        self._failures = 0
        self._disk_full = False
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self.waiting = threading.Event()

    def hold_commits(self) -> None:
        self._gate.clear()

    def release_commits(self) -> None:
        self._gate.set()

    def fail_commits(self, count: int = 1, disk_full: bool = True) -> None:
        """Make the next `count` commits fail (and change nothing)."""
        self._failures, self._disk_full = count, disk_full

    def _check_open(self) -> None:
        if not self._open:
            raise SpoolError("spool is not open")

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def damage(self, queue_id: str) -> None:
        self._damaged.add(queue_id)

    def reader(self) -> MemoryReader:
        self._check_open()
        with self._lock:
            return MemoryReader([copy.deepcopy(m) for m in sorted(self._messages.values(), key=lambda m: m.queue_id)],
                                dict(self.backoffs))

    def load(self) -> LoadResult:
        reader = self.reader()
        return LoadResult(reader.messages, [], reader.backoffs)

    def commit(self, batch: Batch) -> None:
        self.write(batch)
        self.sync()

    def sync(self) -> None:
        """Durable at once, unless `hold_commits` holds it (in the spool's thread) until `release_commits`."""
        if not self._gate.is_set():
            self.waiting.set()
            self._gate.wait()
            self.waiting.clear()

    def write(self, batch: Batch) -> None:
        self._check_open()
        with self._lock:
            if self._failures > 0:
                self._failures -= 1
                raise SpoolError("spool transaction failed: injected failure", disk_full=self._disk_full)
            for message in batch.stores:
                if message.queue_id in self._messages:
                    raise SpoolError(f"spool transaction failed: {message.queue_id} exists")
            for message in batch.stores:
                self._messages[message.queue_id] = stored = copy.deepcopy(message)
                if message.queue_id in batch.in_flight:
                    for recipient in stored.recipients:
                        if recipient.state is State.READY:
                            recipient.state = State.IN_FLIGHT
                self._bodies[message.queue_id] = batch.bodies[message.queue_id]
            for update in batch.updates:
                self._update(update)
            for queue_id, (warned, forward_shard) in batch.flags.items():
                if queue_id in self._messages:
                    self._messages[queue_id].warned = warned
                    self._messages[queue_id].forward_shard = forward_shard
            for queue_id in batch.removals:
                self._messages.pop(queue_id, None)
                self._bodies.pop(queue_id, None)
            for entry in batch.usage_adds:
                self._usage.setdefault(entry.entry_id, entry)
            for entry_id in batch.usage_removals:
                self._usage.pop(entry_id, None)
            for domain, until in batch.backoffs.items():
                if until > 0:
                    self.backoffs[domain] = until
                else:
                    self.backoffs.pop(domain, None)
            self.commits += 1

    def _update(self, update: RecipientUpdate) -> None:
        message = self._messages.get(update.queue_id)
        if message is None:
            return
        recipient = message.recipients[update.index]
        recipient.state, recipient.attempts, recipient.next_attempt = update.state, update.attempts, update.next_attempt
        recipient.last = update.last

    def load_usage(self) -> list[UsageEntry]:
        self._check_open()
        with self._lock:
            return list(self._usage.values())

    def read_bodies(self, queue_ids: Iterable[str]) -> Bodies:
        self._check_open()
        bodies = Bodies()
        for queue_id in queue_ids:
            if queue_id in self._damaged and queue_id in self._bodies:
                bodies.damaged[queue_id] = "checksum mismatch"
            elif queue_id in self._bodies:
                bodies[queue_id] = self._bodies[queue_id]
        return bodies

    def read_headers(self, queue_id: str) -> bytes | None:
        body = self._bodies.get(queue_id)
        if body is None:
            return None
        end = body.find(b"\r\n\r\n")
        return body if end < 0 else body[:end + 2]

    def quarantine(self, queue_id: str, reason: str) -> Quarantined:
        with self._lock:
            self._messages.pop(queue_id, None)
            self._bodies.pop(queue_id, None)
            self._damaged.discard(queue_id)
            self.quarantined[queue_id] = reason
        return Quarantined(queue_id, reason, "memory")

    def free_space(self) -> int:
        return self.free_bytes

    def recipients(self, queue_id: str) -> list[tuple[str, str]]:
        """(address, state) of a stored message's recipients, as committed (for assertions)."""
        with self._lock:
            message = self._messages.get(queue_id)
            return [] if message is None else [(r.address, r.state.value) for r in message.recipients]

    def queue_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._messages)


class MemoryReader:
    """A snapshot of a memory spool's queue, read in chunks (spool.py: SpoolReader)."""

    def __init__(self, messages: list[Message], backoffs: dict[str, float]) -> None:
        self.messages = messages
        self.total = len(messages)
        self.backoffs = backoffs
        self._next = 0
        self._done = False

    def read(self, count: int) -> LoadResult | None:
        if self._done:
            return None
        chunk = self.messages[self._next:self._next + count]
        self._next += len(chunk)
        self._done = len(chunk) < count
        return LoadResult(chunk, [])

    def close(self) -> None:
        self._done = True
