"""The durable spool of one shard: an interface and its SQLite implementation.

Operations (all blocking; the shard calls them from one dedicated thread):
    open()                 create or open the spool directory and database
    reader()               the stored queue as it is now (a snapshot), read in chunks while commits go on
                           (`SpoolReader.read(n)`: recovery, in the background once the shard serves), and the
                           destinations held off; a record that fails its checks is quarantined and reported,
                           never deleted
    load()                 the whole of `reader()` at once (tools and tests)
    commit(batch)          one transaction: store new messages (with their bodies), update recipient states,
                           remove finished messages, set or end destination backoffs; returns after the
                           transaction is durable (fsync): `write(batch)` then `sync()`
    write(batch)           the same transaction, written but not yet durable (the caller's thread: the event loop)
    sync()                 make every transaction written so far durable (fsync; the spool's thread)
    read_bodies(ids)       message bodies for dispatch (bodies are not kept in memory), each checked against
                           its record's checksum; a damaged record is left out and named (`Bodies.damaged`)
    load_usage()           the per-user sending counters (cluster.queue.usage), committed by `commit` too
    quarantine(id, why)    move a record aside: <dir>/quarantine/<queue_id>.msgpack (and its body file to
                           <queue_id>.body), then drop it from the db
    free_space()           bytes available to unprivileged users on the spool's file system

SQLite runs in WAL mode. A transaction appends to the write-ahead log (`write`, synchronous=NORMAL: no fsync
there), and `sync` fsyncs the log itself: every transaction written before it began is then durable, the same
guarantee as synchronous=FULL (which fsyncs the log at each commit), while the shard writes on its event loop
and waits for the fsync in another thread (cluster/queue/commit.py). A crash at any point leaves the last
synced state or a later one (the log's checksums end it at the last whole transaction). A failed fsync stops
the spool until it is opened again (a later fsync could succeed over pages the kernel dropped). Checkpoints (copying
the log into the database file, which fsyncs both) run in a thread of their own on a connection of their own
once the log holds CHECKPOINT_PAGES pages not yet copied, never in a commit; one connection serves everything
else, one thread at a time (a lock).
A body of `BODY_FILE_MIN` bytes or more is not put in its row but in a file of its own,
`<directory>/bodies/<queue_id>`, written with the transaction that stores the row and fsynced (with the
directory) by the same `sync`, before the log; it is unlinked once the transaction that removes it is synced:
a 1 MiB blob cost about 3 ms of CPU in the write-ahead log, its checkpoint and the freeing of its overflow
pages, the file about 0.4 ms (ARCHITECTURE.md performance notes). A crash before that `sync` ends leaves a file
without a row, which `open()` removes, or a row whose file is missing or short: a damaged record (quarantined
when its body is read) of a message that was never answered Stored.
Each message row carries a checksum of its immutable parts (sender, arrival, body, recipient addresses). It
is checked when the body is read for delivery, not at load (a restart reads no body: ARCHITECTURE.md performance
notes): a mismatch means the record is damaged, and the shard quarantines it then (spoolio.py) instead of
delivering it. `read_headers` (for DSNs and `queue show`) does not check it. New rows carry a CRC-32
("crc32:" and 8 hex digits); rows of earlier releases carry a BLAKE2b-128 (32 hex digits), still verified.

A recipient's last outcome is stored field by field (kind, code, enhanced, reply_text, remote). Spools written
before those columns existed kept it as one `last_reply` string: `open()` adds the columns, and `load()` reads
such an old row's string once (`legacy_outcome`) and the row is written typed at its next change.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import struct
import threading
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack

from cluster.bus.schemas import OutcomeKind
from cluster.queue.records import LastOutcome, Message, Recipient, RecipientUpdate, State
from cluster.queue.usage import UsageEntry


class SpoolError(OSError):
    """The spool cannot be used (unreadable, full, or a transaction failed): an I/O error of the shard."""

    def __init__(self, text: str, disk_full: bool = False) -> None:
        super().__init__(text)
        self.disk_full = disk_full


@dataclass
class Batch:
    stores: list[Message] = field(default_factory=list)
    bodies: dict[str, bytes] = field(default_factory=dict)
    updates: list[RecipientUpdate] = field(default_factory=list)
    # queue_id -> new (warned, forward_shard) flags
    flags: dict[str, tuple[bool, int]] = field(default_factory=dict)
    removals: list[str] = field(default_factory=list)
    # Per-user sending counters (cluster.queue.usage): entries to record and entry ids to delete.
    usage_adds: list[UsageEntry] = field(default_factory=list)
    usage_removals: list[str] = field(default_factory=list)
    # destination (domain key) -> held off until (epoch seconds); 0.0 ends a backoff (scheduler.py)
    backoffs: dict[str, float] = field(default_factory=dict)
    # Queue ids among `stores` whose ready recipients are written in flight: the message is dispatched right
    # after this transaction (dispatch.py), so that needs no transaction of its own.
    in_flight: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.stores or self.updates or self.flags or self.removals or self.usage_adds
                    or self.usage_removals or self.backoffs)

    def add_message(self, message: Message, body: bytes) -> None:
        """Store a new message (and its body) in this batch's transaction."""
        self.stores.append(message)
        self.bodies[message.queue_id] = body


@dataclass(frozen=True)
class Quarantined:
    queue_id: str
    reason: str
    path: str


@dataclass
class LoadResult:
    messages: list[Message]
    quarantined: list[Quarantined]
    # destinations held off at the last stop: domain key -> until (epoch seconds)
    backoffs: dict[str, float] = field(default_factory=dict)


class Bodies(dict[str, bytes]):
    """Bodies read for delivery, by queue id. A record that failed its checks is left out and named in `damaged`
    (queue id -> reason); `quarantined` is filled by whoever moved those aside (spoolio.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.damaged: dict[str, str] = {}
        self.quarantined: list[Quarantined] = []


class SpoolReader(Protocol):
    # Messages in the snapshot, and the destinations held off in it.
    total: int
    backoffs: dict[str, float]

    def read(self, count: int) -> LoadResult | None: ...

    def close(self) -> None: ...


class Spool(Protocol):
    def open(self) -> None: ...

    def reader(self) -> SpoolReader: ...

    def load(self) -> LoadResult: ...

    def commit(self, batch: Batch) -> None: ...

    def write(self, batch: Batch) -> None: ...

    def sync(self) -> None: ...

    def read_bodies(self, queue_ids: Iterable[str]) -> Bodies: ...

    def load_usage(self) -> list[UsageEntry]: ...

    def read_headers(self, queue_id: str) -> bytes | None: ...

    def quarantine(self, queue_id: str, reason: str) -> Quarantined: ...

    def free_space(self) -> int: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    arrival REAL NOT NULL,
    size INTEGER NOT NULL,
    client TEXT NOT NULL,
    warned INTEGER NOT NULL DEFAULT 0,
    forward_shard INTEGER NOT NULL DEFAULT -1,
    checksum TEXT NOT NULL,
    body BLOB NOT NULL,
    body_file INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipients (
    queue_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_reply TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    code INTEGER NOT NULL DEFAULT 0,
    enhanced TEXT NOT NULL DEFAULT '',
    reply_text TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (queue_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    entry_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    at REAL NOT NULL,
    messages INTEGER NOT NULL,
    recipients INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS backoffs (
    domain TEXT PRIMARY KEY,
    until REAL NOT NULL
) WITHOUT ROWID;
"""
# Columns added since the first release, with their definitions (added by `open` to an older spool).
_ADDED_COLUMNS = {"kind": "TEXT NOT NULL DEFAULT ''", "code": "INTEGER NOT NULL DEFAULT 0",
                  "enhanced": "TEXT NOT NULL DEFAULT ''", "reply_text": "TEXT NOT NULL DEFAULT ''"}
# ... and to the messages table: 1 when the body is in its own file (bodies/<queue_id>) and the blob is empty.
_ADDED_MESSAGE_COLUMNS = {"body_file": "INTEGER NOT NULL DEFAULT 0"}
_LEGACY_REPLY = re.compile(r"^(?P<code>[245]\d\d)(?:[ -](?P<enhanced>[245]\.\d{1,3}\.\d{1,3}))?\b\s*(?P<text>.*)$",
                           re.S)
_log = logging.getLogger("mtacluster.queue")
# Page size of a new spool: a 4 KiB page holds one 2 KiB message and wastes the rest (1.8x the data on disk).
PAGE_SIZE = 16384
# Messages per chunk when the queue is read at start (one spool-thread call, one turn of the event loop).
LOAD_CHUNK = 5000
# After a checkpoint the write-ahead log is cut back to this size (it grows with the largest batch).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Free pages given back to the file system per commit that removed messages (bounded work in the hot path).
# Bodies of at least this many bytes are kept in a file of their own beside the row (see the top of this module):
# below it the write-ahead log is cheaper (one fsync for the whole batch, no file to create and unlink).
BODY_FILE_MIN = 128 * 1024
BODIES = "bodies"
_FILE_NAME = re.compile(r"[A-Za-z0-9]{1,64}")
VACUUM_PAGES = 256
# A checkpoint starts (in its own thread) once the write-ahead log holds this many pages (SQLite's default).
CHECKPOINT_PAGES = 1000
# The log starts over from its beginning only when a write finds every page of it copied, and a background
# checkpoint always lags the committer's next write by a little: once the log holds more than this (its frames
# since it last started over, not the file's size: the file keeps its size, up to WAL_SIZE_LIMIT), a sync that
# finds at most RESTART_PAGES pages left copies them itself (no write runs during a sync), so that the next write
# starts the log over instead of the log growing for ever. (Judged by the file's size, every sync after the first
# 16 MiB copied the log itself: two more fsyncs per transaction.)
WAL_RESTART_BYTES = 16 * 1024 * 1024
RESTART_PAGES = 64
# The wal-index header (-shm): two copies of the 48-byte header, then nBackfill; mxFrame is at offset 16.
_SHM_HEADER = 100
_SHM_FRAMES = struct.Struct("=I")
_WAL_FRAME_HEADER = 24  # bytes before each page in the log
_KINDS = {k.value for k in OutcomeKind}
_STATE_OF = {s.value: s for s in State}
IN_FLIGHT = State.IN_FLIGHT.value
READY = State.READY  # (a module constant: an enum member looked up on its class is slow on Python 3.11)
_NUMBERS = (int, float)
RecipientRow = tuple[int, str, str, int, float, str, str, str, int, str, str]


def _last_columns(last: LastOutcome | None) -> tuple[str, int, str, str, str]:
    """(kind, code, enhanced, reply_text, remote) of a last outcome, all empty for none."""
    if last is None:
        return "", 0, "", "", ""
    return last.kind._value_, last.code, last.enhanced, last.text, last.remote  # _value_: no enum descriptor


def legacy_outcome(state: State, last_reply: str, remote: str) -> LastOutcome | None:
    """The typed outcome of a row written before the typed columns existed ("550 5.1.1 words" in one string)."""
    if not last_reply:
        return None
    match = _LEGACY_REPLY.match(last_reply)
    code, enhanced, text = (int(match["code"]), match["enhanced"] or "", match["text"]) if match else \
        (0, "", last_reply)
    if state is State.DELIVERED:
        kind = OutcomeKind.DELIVERED
    elif state is State.FAILED:
        kind = OutcomeKind.EXPIRED if enhanced == "4.4.7" else OutcomeKind.FAILED
    else:
        kind = OutcomeKind.DEFERRED
    return LastOutcome(kind, code, enhanced, text, remote)


def _checksum_head(sender: str, arrival: float, addresses: Iterable[str]) -> bytes:
    """Sender, arrival and each address, each followed by a NUL, in UTF-8 (surrogates escaped): joined as text and
    encoded once (one encode per address cost ~1 us each, 100 for a many-recipient message)."""
    return ("\0".join([sender, repr(float(arrival)), *addresses]) + "\0").encode("utf-8", "surrogateescape")


def checksum(sender: str, arrival: float, body: bytes, addresses: Iterable[str]) -> str:
    """The checksum of a record's immutable parts, as new rows carry it: "crc32:" and 8 hex digits.

    It detects a damaged record, not a forged one (whoever can write the spool can write the checksum too), so a
    CRC does: zlib's runs at about 4 GB/s here, BLAKE2b (the earlier releases' checksum) at 0.7 GB/s. The body is
    not copied: the CRC of the head goes on over the body."""
    return f"crc32:{zlib.crc32(body, zlib.crc32(_checksum_head(sender, arrival, addresses))):08x}"


def legacy_checksum(sender: str, arrival: float, body: bytes, addresses: Iterable[str]) -> str:
    """The checksum rows of earlier releases carry: BLAKE2b-128 of the same parts, 32 hex digits."""
    digest = hashlib.blake2b(_checksum_head(sender, arrival, addresses), digest_size=16)
    digest.update(body)
    return digest.hexdigest()


def checksum_matches(stored: object, sender: str, arrival: float, body: bytes, addresses: list[str]) -> bool:
    """Whether `stored` (a row's checksum column, of this release or an earlier one) matches these parts."""
    if not isinstance(stored, str):
        return False
    if stored.startswith("crc32:"):
        return stored == checksum(sender, arrival, body, addresses)
    return stored == legacy_checksum(sender, arrival, body, addresses)


class SqliteSpool:
    """Spool in `<directory>/spool.sqlite3`; quarantined records under `<directory>/quarantine/`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._bodies = self.directory / BODIES
        # The write-ahead log and its index, as strings (stat'ed at every sync: no Path made each time).
        self._wal_path = str(self.directory / "spool.sqlite3-wal")
        self._shm_path = str(self.directory / "spool.sqlite3-shm")
        # Queue ids whose body is in a file (those left at open, and stored since): a removal unlinks only these.
        self._in_files: set[str] = set()
        # Body files written and not yet fsynced; files of removed messages, to unlink once the removal is durable.
        self._unsynced: set[str] = set()
        self._doomed: list[str] = []
        self._db: sqlite3.Connection | None = None
        self._lock: int | None = None
        self._reader: SqliteReader | None = None
        # The connection serves the event loop's writes and the spool thread's reads: one at a time.
        self._using = threading.Lock()
        self._wal: int | None = None  # descriptor of the write-ahead log, for `sync`
        self._shm: int | None = None  # descriptor of its index, for `_log_frames`
        self._page_size = PAGE_SIZE  # this spool's (an older one has 4 KiB pages), read at open
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpoint_db: sqlite3.Connection | None = None
        self._checkpointing: Future[None] | None = None
        # Set by a failed fsync: the log holds transactions whose pages the kernel may have dropped, so nothing
        # more is written or called durable until the spool is opened again (SQLite's recovery reads what is on
        # disk then).
        self._broken: str | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    def open(self) -> None:
        try:
            make_directory(self.directory)
            (self.directory / "quarantine").mkdir(exist_ok=True)
            self._bodies.mkdir(exist_ok=True)
            self._take_lock()
            db = sqlite3.connect(self.directory / "spool.sqlite3", isolation_level=None, check_same_thread=False)
            if db.execute("PRAGMA page_count").fetchone()[0] == 0:
                # A new spool (older ones keep their layout): big pages hold several 2 KiB messages each,
                # and pages freed by delivered mail go back to the file system (ARCHITECTURE.md performance notes).
                db.execute(f"PRAGMA page_size={PAGE_SIZE}")
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # Durability comes from `sync` (module docstring); checkpoints from `_checkpoint`, never in a write.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.executescript(_SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(recipients)")}
            for name, definition in _ADDED_COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE recipients ADD COLUMN {name} {definition}")
            present = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
            for name, definition in _ADDED_MESSAGE_COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE messages ADD COLUMN {name} {definition}")
            self._sweep_body_files(db)
            self._db = db
            self.sync()  # the schema, and the log file's name in the directory
            _fsync_directory(self.directory)
        except (OSError, sqlite3.Error) as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._release_lock()
            raise SpoolError(f"cannot open the spool in {self.directory}: {exc}") from None

    def _sweep_body_files(self, db: sqlite3.Connection) -> None:
        """Remove body files whose row is gone: a crash after the file was written and before its row was
        committed, or after the row was removed and before the file was unlinked. One look-up per file (files
        hold only big bodies, so there are few), no scan of the table."""
        for entry in os.scandir(self._bodies):
            row = db.execute("SELECT body_file FROM messages WHERE queue_id=?", (entry.name,)).fetchone()
            if row is None or not row[0]:
                os.unlink(entry.path)
            else:
                self._in_files.add(entry.name)

    def _take_lock(self) -> None:
        """One process per spool: a second shard on the same directory would re-queue the first one's jobs."""
        descriptor = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(descriptor)
            raise OSError(f"the spool {self.directory} is in use by another process (pid {holder}): "
                          f"one shard per spool") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._lock = descriptor

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._checkpointer is not None:
            self._checkpointer.shutdown(wait=True)
            self._checkpointer = None
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
            self._checkpoint_db = None
        with self._using:
            if self._db is not None:
                self._db.close()  # the last connection: SQLite checkpoints (fsynced) and removes the log
                self._db = None
        for descriptor in (self._wal, self._shm):
            if descriptor is not None:
                os.close(descriptor)
        self._wal = self._shm = None
        self._release_lock()

    def load(self) -> LoadResult:
        """Every stored message (`reader()` read to its end, in one go): for tools and tests."""
        reader = self.reader()
        try:
            result = LoadResult([], [], reader.backoffs)
            while (part := reader.read(LOAD_CHUNK)) is not None:
                result.messages.extend(part.messages)
                result.quarantined.extend(part.quarantined)
            return result
        finally:
            reader.close()

    def reader(self) -> SqliteReader:
        """The queue as it is now, to be read in chunks while this spool goes on committing (see SqliteReader)."""
        self.db  # noqa: B018  (raises SpoolError when the spool is not open)
        try:
            self._reader = SqliteReader(self)
            return self._reader
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read the spool in {self.directory}: {exc}") from None

    def commit(self, batch: Batch) -> None:
        self.write(batch)
        self.sync()

    def sync(self) -> None:
        """Make the write-ahead log durable (fdatasync, as SQLite's own synchronous=FULL does): every transaction
        written before this call is durable when it returns. Then, if the log holds CHECKPOINT_PAGES pages not yet
        copied into the database, a checkpoint starts in the background."""
        self._check_not_broken()
        with self._using:  # what was written before this sync began
            files, self._unsynced = self._unsynced, set()
            doomed, self._doomed = self._doomed, []
        try:
            for queue_id in files:  # the body files first: a durable row never points to a lost file
                with contextlib.suppress(FileNotFoundError):  # its row failed or was removed since
                    descriptor = os.open(self._bodies / queue_id, os.O_RDONLY)
                    try:
                        os.fsync(descriptor)
                    finally:
                        os.close(descriptor)
            if files:
                _fsync_directory(self._bodies)
            try:
                wal = self._wal = _current(self._wal, self._wal_path)
            except FileNotFoundError:  # no log: nothing was written since it was last copied and removed
                wal = None
            if wal is not None:
                os.fdatasync(wal)
        except OSError as exc:
            with self._using:
                self._unsynced |= files
                self._doomed[:0] = doomed
            # After a failed fsync, a later one may succeed although the pages it failed on never reach the disk
            # (Linux reports the error once): the transactions written after them would then be lost with them
            # at a power loss. So the spool stops here, and the shard refuses mail until it is restarted.
            self._broken = f"an fsync of the spool in {self.directory} failed ({exc}); restart the shard"
            _log.error("spool %s: fsync failed: %s; nothing more is stored until the shard restarts",
                       self.directory, exc)
            raise SpoolError(f"cannot make the spool durable (fsync of its log in {self.directory}): {exc}") from None
        if doomed:
            with self._using:
                self._unlink_body_files(doomed)
        try:
            self._after_sync(wal)
        except (OSError, RuntimeError) as exc:  # the data is durable all the same: say so, and log this
            _log.warning("spool %s: cannot start a checkpoint: %s", self.directory, exc)

    def _after_sync(self, wal: int | None) -> None:
        """Start a checkpoint in the background when the log holds CHECKPOINT_PAGES pages not yet copied, or copy
        the last few pages now when the log file has grown past WAL_RESTART_BYTES (see there)."""
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        frames, backfilled = self._log_frames()
        pending = frames - backfilled
        long = wal is not None and frames * (self._page_size + _WAL_FRAME_HEADER) > WAL_RESTART_BYTES
        if 0 < pending <= RESTART_PAGES and long:
            self._checkpoint()
        elif pending >= CHECKPOINT_PAGES or (pending > 0 and long):
            if self._checkpointer is None:
                self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="spool-checkpoint")
            self._checkpointing = self._checkpointer.submit(self._checkpoint)

    def _check_not_broken(self) -> None:
        if self._broken is not None:
            raise SpoolError(self._broken)

    def _log_frames(self) -> tuple[int, int]:
        """Pages in the log since it last started over, and how many of them were copied into the database:
        mxFrame and nBackfill from the wal-index header (the -shm file; SQLite's documented WAL-index format,
        native byte order). The log file's size says nothing here: the log is written again from its start after
        each complete checkpoint."""
        try:
            self._shm = _current(self._shm, self._shm_path)
            header = os.pread(self._shm, _SHM_HEADER, 0)
        except OSError:
            header = b""
        if len(header) < _SHM_HEADER:  # no index to read: judge by the log's size (may checkpoint more often)
            with contextlib.suppress(OSError):
                return os.stat(self._wal_path).st_size // self._page_size, 0
            return 0, 0
        frames: int = _SHM_FRAMES.unpack_from(header, 16)[0]
        backfilled: int = _SHM_FRAMES.unpack_from(header, 96)[0]
        return frames, min(frames, backfilled)

    def _checkpoint(self) -> None:
        """Copy the log into the database file (its own connection; writers go on meanwhile). SQLite fsyncs the
        log before and the database after; the log starts over at the next write once it is all copied."""
        try:
            if self._checkpoint_db is None:
                self._checkpoint_db = sqlite3.connect(self.directory / "spool.sqlite3", isolation_level=None,
                                                      check_same_thread=False)
                self._checkpoint_db.execute("PRAGMA synchronous=FULL")
            self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the log only grows meanwhile; the next sync tries again
            _log.warning("spool %s: checkpoint failed: %s", self.directory, exc)


    def write(self, batch: Batch) -> None:
        """One transaction, written to the log but not yet durable: `sync()` makes it so."""
        self._check_not_broken()
        with self._using:
            self._write(batch)

    def _write(self, batch: Batch) -> None:
        db = self.db
        in_files = self._write_body_files(batch)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for message in batch.stores:
                    body = batch.bodies[message.queue_id]
                    addresses = [r.address for r in message.recipients]
                    out = message.queue_id in batch.in_flight
                    in_file = message.queue_id in in_files
                    db.execute(
                        "INSERT INTO messages (queue_id, sender, arrival, size, client, warned, forward_shard, "
                        "checksum, body, body_file) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (message.queue_id, message.sender, message.arrival, message.size, message.client_json,
                         int(message.warned), message.forward_shard,
                         checksum(message.sender, message.arrival, body, addresses), b"" if in_file else body,
                         int(in_file)))
                    db.executemany(
                        "INSERT INTO recipients (queue_id, idx, address, state, attempts, next_attempt, kind, code,"
                        " enhanced, reply_text, remote) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(message.queue_id, r.index, r.address,
                          IN_FLIGHT if out and r.state is READY else r.state._value_, r.attempts,
                          r.next_attempt, *_last_columns(r.last)) for r in message.recipients])
                # A message removed in this transaction needs no update of its recipients first.
                removed = set(batch.removals)
                db.executemany(
                    "UPDATE recipients SET state=?, attempts=?, next_attempt=?, kind=?, code=?, enhanced=?, "
                    "reply_text=?, remote=?, last_reply='' WHERE queue_id=? AND idx=?",
                    [(u.state._value_, u.attempts, u.next_attempt, *_last_columns(u.last), u.queue_id, u.index)
                     for u in batch.updates if u.queue_id not in removed])
                db.executemany("UPDATE messages SET warned=?, forward_shard=? WHERE queue_id=?",
                               [(int(w), f, q) for q, (w, f) in batch.flags.items()])
                db.executemany("DELETE FROM recipients WHERE queue_id=?", [(q,) for q in batch.removals])
                db.executemany("DELETE FROM messages WHERE queue_id=?", [(q,) for q in batch.removals])
                db.executemany("INSERT OR IGNORE INTO usage (entry_id, user, at, messages, recipients) "
                               "VALUES (?, ?, ?, ?, ?)",
                               [(u.entry_id, u.user, u.at, u.messages, u.recipients) for u in batch.usage_adds])
                db.executemany("DELETE FROM usage WHERE entry_id=?", [(e,) for e in batch.usage_removals])
                db.executemany("INSERT OR REPLACE INTO backoffs (domain, until) VALUES (?, ?)",
                               [(d, u) for d, u in batch.backoffs.items() if u > 0])
                db.executemany("DELETE FROM backoffs WHERE domain=?",
                               [(d,) for d, u in batch.backoffs.items() if u <= 0])
                if batch.removals:
                    _give_back_pages(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except BaseException as exc:
            self._unlink_body_files(in_files)  # their rows were not stored (whatever stopped the transaction)
            if not isinstance(exc, sqlite3.Error):
                raise
            full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
            raise SpoolError(f"spool transaction failed: {exc}", disk_full=full) from None
        self._in_files |= in_files
        if self._in_files:
            # Their files go once the removal is durable (`sync`; a crash before leaves them to open()'s sweep).
            self._doomed.extend(q for q in batch.removals if q in self._in_files)

    def _write_body_files(self, batch: Batch) -> set[str]:
        """Write the batch's big bodies to their files (`sync` makes them durable, each file, then the directory,
        before the log); the queue ids whose body is in a file."""
        in_files: set[str] = set()
        descriptors: list[int] = []
        try:
            for message in batch.stores:
                body = batch.bodies[message.queue_id]
                # A queue id that has a file already is a duplicate store: its row fails, the file stays intact.
                if len(body) < BODY_FILE_MIN or message.queue_id in self._in_files \
                        or not _FILE_NAME.fullmatch(message.queue_id):
                    continue
                in_files.add(message.queue_id)
                descriptor = os.open(self._bodies / message.queue_id, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                descriptors.append(descriptor)
                with memoryview(body) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(descriptor, view[written:])
            self._unsynced |= in_files  # made durable by `sync`, with the transaction that stores their rows
        except OSError as exc:
            self._unlink_body_files(in_files)
            raise SpoolError(f"cannot write a message body file: {exc}",
                             disk_full=exc.errno in (errno.ENOSPC, errno.EDQUOT)) from None
        finally:
            for descriptor in descriptors:
                os.close(descriptor)
        return in_files

    def _unlink_body_files(self, queue_ids: Iterable[str]) -> None:
        """Unlink the body files of these messages (best effort: what is left, open()'s sweep removes)."""
        for queue_id in queue_ids:
            self._in_files.discard(queue_id)
            self._unsynced.discard(queue_id)
            with contextlib.suppress(OSError):
                os.unlink(self._bodies / queue_id)

    def load_usage(self) -> list[UsageEntry]:
        try:
            with self._using:
                rows = self.db.execute("SELECT entry_id, user, at, messages, recipients FROM usage").fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read the usage counters: {exc}") from None
        return [UsageEntry(str(e), str(u), float(a), int(m), int(r)) for e, u, a, m, r in rows]

    def read_bodies(self, queue_ids: Iterable[str]) -> Bodies:
        """The bodies of stored messages, each checked against its record's checksum (sender, arrival, body,
        recipient addresses) as it is read; a record that fails is left out and named in `damaged`."""
        bodies = Bodies()
        db = self.db
        for queue_id in queue_ids:
            try:
                with self._using:
                    row = db.execute("SELECT sender, arrival, checksum, body, body_file FROM messages "
                                     "WHERE queue_id=?", (queue_id,)).fetchone()
                    if row is None:
                        continue
                    addresses = [a for (a,) in db.execute(
                        "SELECT address FROM recipients WHERE queue_id=? ORDER BY idx", (queue_id,))]
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot read {queue_id}: {exc}") from None
            sender, arrival, stored_sum, body, body_file = row
            if body_file:
                body = self._read_body_file(queue_id)
                if body is None:
                    bodies.damaged[queue_id] = "body file is missing"
                    continue
            problem = _check_body(sender, arrival, stored_sum, body, addresses)
            if problem:
                bodies.damaged[queue_id] = problem
            else:
                bodies[queue_id] = body
        return bodies

    def _read_body_file(self, queue_id: str) -> bytes | None:
        """The body kept in the message's own file; None when the file is missing."""
        try:
            with open(self._bodies / queue_id, "rb", buffering=0) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SpoolError(f"cannot read the body of {queue_id}: {exc}") from None

    def _body(self, queue_id: str) -> bytes | None:
        try:
            with self._using:
                row = self.db.execute("SELECT body, body_file FROM messages WHERE queue_id=?",
                                      (queue_id,)).fetchone()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read {queue_id}: {exc}") from None
        if row is None:
            return None
        return self._read_body_file(queue_id) if row[1] else bytes(row[0])

    def read_headers(self, queue_id: str) -> bytes | None:
        body = self._body(queue_id)
        if body is None:
            return None
        end = body.find(b"\r\n\r\n")
        return body if end < 0 else body[:end + 2]

    def quarantine(self, queue_id: str, reason: str) -> Quarantined:
        """Write every column of the record to a file (fsynced), then drop it from the database."""
        db = self.db
        with self._using:
            message = db.execute("SELECT * FROM messages WHERE queue_id=?", (queue_id,)).fetchone()
            recipients = db.execute("SELECT * FROM recipients WHERE queue_id=?", (queue_id,)).fetchall()
        record = {"queue_id": queue_id, "reason": reason,
                  "message": list(message) if message else None, "recipients": [list(r) for r in recipients]}
        safe_name = "".join(c if c.isalnum() else "_" for c in queue_id)[:64] or "unnamed"
        path = self.directory / "quarantine" / f"{safe_name}.msgpack"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(msgpack.packb(record, use_bin_type=True, default=repr))
            f.flush()
            os.fsync(f.fileno())
        if _FILE_NAME.fullmatch(queue_id):  # a body in its own file goes beside the record, as <name>.body
            with self._using:  # the event loop's writes look at `_in_files`
                self._in_files.discard(queue_id)
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._bodies / queue_id, self.directory / "quarantine" / f"{safe_name}.body")
        # Both directory entries durable before the row goes: after a power loss a body back in bodies/ with no
        # row would be removed at open as a leftover, and a record file not in quarantine/ would be lost.
        _fsync_directory(self.directory / "quarantine")
        _fsync_directory(self._bodies)
        try:
            with self._using:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM recipients WHERE queue_id=?", (queue_id,))
                db.execute("DELETE FROM messages WHERE queue_id=?", (queue_id,))
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot quarantine {queue_id}: {exc}") from None
        self.sync()
        return Quarantined(queue_id, reason, str(path))

    def free_space(self) -> int:
        stats = os.statvfs(self.directory)
        return stats.f_bavail * stats.f_frsize


class SqliteReader:
    """The queue of a spool as it was when the reader was made, read in chunks in queue id order.

    Its own connection holds one read transaction (WAL: a snapshot) from the start, so what the spool commits
    meanwhile is not seen: a message stored after the reader was made (new mail, a transfer) is never loaded a
    second time, and a message is read as it was then (nothing changes a message the shard has not loaded
    yet). The two tables are streamed side by side, recipient rows grouped per message as they go by. Bodies
    and checksums are not read here: `read_bodies` checks them when a body is read for delivery. A record whose
    scheduling columns fail their checks, and recipient rows without a message, are quarantined (through the
    spool's own connection) in the chunk where they are found.
    """

    def __init__(self, spool: SqliteSpool) -> None:
        self._spool = spool
        db = sqlite3.connect(spool.directory / "spool.sqlite3", isolation_level=None, check_same_thread=False)
        self._db: sqlite3.Connection | None = db
        try:
            db.execute("PRAGMA query_only=1")
            db.execute("BEGIN")
            self.total: int = db.execute("SELECT count(*) FROM messages").fetchone()[0]
            self.backoffs = {domain: float(until) for domain, until in db.execute("SELECT domain, until FROM backoffs")
                             if isinstance(domain, str) and isinstance(until, int | float)}
            self._messages = db.execute("SELECT queue_id, sender, arrival, size, client, warned, forward_shard "
                                        "FROM messages ORDER BY queue_id")
            self._recipients = db.execute(
                "SELECT queue_id, idx, address, state, attempts, next_attempt, last_reply, remote, kind, code, "
                "enhanced, reply_text FROM recipients ORDER BY queue_id, idx")
            self._pending = next(self._recipients, None)
        except BaseException:
            self.close()
            raise
        self._done = False

    def read(self, count: int) -> LoadResult | None:
        """The next `count` messages (fewer at the end), and what was quarantined on the way; None once done."""
        if self._done:
            return None
        messages: list[Message] = []
        damaged: list[tuple[str, str]] = []
        pending, recipient_rows = self._pending, self._recipients
        try:
            chunk = self._messages.fetchmany(count)
            for queue_id, sender, arrival, size, client, warned, forward_shard in chunk:
                if not isinstance(queue_id, str):
                    damaged.append((queue_id, "message columns have the wrong types"))
                    continue
                rows: list[RecipientRow] = []
                while pending is not None and pending[0] <= queue_id:
                    if pending[0] == queue_id:
                        rows.append(pending[1:])
                    elif not damaged or damaged[-1][0] != pending[0]:
                        damaged.append((pending[0], "recipients without a message record"))
                    pending = next(recipient_rows, None)
                problem = _check_message(queue_id, sender, arrival, rows)
                if problem:
                    damaged.append((queue_id, problem))
                    continue
                recipients = [Recipient(idx, address, _STATE_OF[state], attempts,
                                        float(next_attempt) if next_attempt else 0.0,
                                        _last_of(_STATE_OF[state], last_reply, remote, kind, code, enhanced,
                                                 reply_text) if kind or last_reply else None)
                              for idx, address, state, attempts, next_attempt, last_reply, remote, kind, code,
                              enhanced, reply_text in rows]
                messages.append(Message.loaded(queue_id, sender, float(arrival), recipients, int(size),
                                               client if isinstance(client, str) else "{}", bool(warned),
                                               int(forward_shard)))
            if len(chunk) < count:
                while pending is not None:
                    if not damaged or damaged[-1][0] != pending[0]:
                        damaged.append((pending[0], "recipients without a message record"))
                    pending = next(recipient_rows, None)
                self._done = True
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read the spool in {self._spool.directory}: {exc}") from None
        self._pending = pending
        return LoadResult(messages, [self._spool.quarantine(queue_id, reason) for queue_id, reason in damaged])

    def close(self) -> None:
        """End the read transaction (the write-ahead log can be checkpointed past it again)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        self._done = True


def make_directory(path: Path) -> None:
    """`path.mkdir(parents=True, exist_ok=True)`, with each directory it creates made durable in its parent
    (the parent fsynced): a crash after the spool answered Stored must not lose the directory holding it."""
    if path.is_dir():
        return
    make_directory(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return  # made meanwhile by someone else, who makes it durable
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current(descriptor: int | None, path: str) -> int:
    """An open descriptor of `path`: `descriptor` while it is still that file, else a new one (SQLite removes
    the log and its index when the last connection closes, and makes new ones at the next open)."""
    if descriptor is not None:
        if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
            return descriptor
        os.close(descriptor)
    return os.open(path, os.O_RDONLY)


def _give_back_pages(db: sqlite3.Connection) -> None:
    """Give up to VACUUM_PAGES free pages back to the file system (a spool with auto_vacuum=INCREMENTAL).

    One statement frees one page per step, and the sqlite3 module steps a statement without result columns
    only once: hence one statement per page."""
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    if free and db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        for _ in range(min(free, VACUUM_PAGES)):
            db.execute("PRAGMA incremental_vacuum(1)")


def _last_of(state: State, last_reply: str, remote: str, kind: str, code: int, enhanced: str,
             reply_text: str) -> LastOutcome | None:
    if kind:
        return LastOutcome(OutcomeKind(kind), code, enhanced, reply_text, remote)
    return legacy_outcome(state, last_reply, remote)


def _check_message(queue_id: object, sender: object, arrival: object, recipients: list[RecipientRow]) -> str:
    """Why a stored record cannot be scheduled, or "" when its scheduling columns are sound (the body and the
    checksum are checked when the body is read: `_check_body`)."""
    if type(queue_id) is not str or type(sender) is not str or not isinstance(arrival, _NUMBERS):
        return "message columns have the wrong types"
    if not recipients:
        return "message has no recipients"
    if [r[0] for r in recipients] != list(range(len(recipients))):
        return "recipient rows are missing"
    for _, address, state, attempts, next_attempt, last_reply, remote, kind, code, enhanced, text in recipients:
        if type(address) is not str or state not in _STATE_OF or type(attempts) is not int \
                or not isinstance(next_attempt, _NUMBERS):
            return "recipient row has bad values"
        if (kind and kind not in _KINDS) or type(code) is not int or type(last_reply) is not str \
                or type(remote) is not str or type(enhanced) is not str or type(text) is not str:
            return "recipient row has a bad last outcome"
    return ""


def _check_body(sender: object, arrival: object, stored_sum: object, body: object, addresses: list[Any]) -> str:
    """Why a record's body cannot be trusted for delivery, or "" when it matches the record's checksum."""
    if type(body) is not bytes:
        return "body is not a blob"
    if type(sender) is not str or not isinstance(arrival, _NUMBERS) or not all(type(a) is str for a in addresses):
        return "message columns have the wrong types"
    if not checksum_matches(stored_sum, sender, float(arrival), body, addresses):
        return "checksum mismatch"
    return ""
