"""The SQLite spool: store, recover, mark, remove, quarantine of damaged records."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from cluster.bus.schemas import OutcomeKind
from cluster.queue.records import LastOutcome, Message, QueueIdFactory, Recipient, RecipientUpdate, State
from cluster.queue.spool import BODIES, BODY_FILE_MIN, Batch, SpoolError, SqliteSpool, checksum, legacy_checksum


def message(queue_id: str, recipients: list[str], sender: str = "s@sender.test") -> Message:
    return Message(queue_id, sender, 1_700_000_000.5, [Recipient(i, r) for i, r in enumerate(recipients)], 10,
                   {"client": "192.0.2.1"})


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[SqliteSpool]:
    spool = SqliteSpool(tmp_path / "shard-0")
    spool.open()
    yield spool
    spool.close()


def test_store_and_recover(spool: SqliteSpool, tmp_path: Path) -> None:
    spool.commit(Batch(stores=[message("Q1", ["a@x.test", "b@y.test"]), message("Q2", ["c@x.test"], sender="")],
                       bodies={"Q1": b"body one", "Q2": b"body two"}))
    spool.close()
    reopened = SqliteSpool(tmp_path / "shard-0")
    reopened.open()
    loaded = reopened.load()
    assert not loaded.quarantined
    assert [m.queue_id for m in loaded.messages] == ["Q1", "Q2"]
    first = loaded.messages[0]
    assert first.sender == "s@sender.test" and first.arrival == 1_700_000_000.5 and first.size == 10
    assert first.client == {"client": "192.0.2.1"}
    assert [(r.index, r.address, r.state, r.domain) for r in first.recipients] == [
        (0, "a@x.test", State.READY, "x.test"), (1, "b@y.test", State.READY, "y.test")]
    assert loaded.messages[1].sender == ""
    assert reopened.read_bodies(["Q1", "Q2", "nope"]) == {"Q1": b"body one", "Q2": b"body two"}
    reopened.close()


SENT = LastOutcome(OutcomeKind.DELIVERED, 250, "2.0.0", "ok", "mx[192.0.2.1]")
LATER = LastOutcome(OutcomeKind.DEFERRED, 421, "4.4.2", "later")


def test_mark_and_remove(spool: SqliteSpool) -> None:
    spool.commit(Batch(stores=[message("Q1", ["a@x.test", "b@y.test"])], bodies={"Q1": b"b"}))
    spool.commit(Batch(updates=[
        RecipientUpdate("Q1", 0, State.DELIVERED, 1, 0.0, SENT),
        RecipientUpdate("Q1", 1, State.DEFERRED, 2, 1234.5, LATER)], flags={"Q1": (True, -1)}))
    loaded = spool.load().messages[0]
    assert loaded.warned
    assert [(r.state, r.attempts, r.next_attempt, r.last) for r in loaded.recipients] == [
        (State.DELIVERED, 1, 0.0, SENT), (State.DEFERRED, 2, 1234.5, LATER)]
    assert loaded.recipients[1].last is not None and loaded.recipients[1].last.kind is OutcomeKind.DEFERRED
    spool.commit(Batch(removals=["Q1"]))
    assert spool.load().messages == []
    assert spool.read_bodies(["Q1"]) == {}


def test_a_failed_transaction_changes_nothing(spool: SqliteSpool) -> None:
    spool.commit(Batch(stores=[message("Q1", ["a@x.test"])], bodies={"Q1": b"b"}))
    with pytest.raises(SpoolError):
        spool.commit(Batch(stores=[message("Q2", ["b@x.test"]), message("Q1", ["dup@x.test"])],
                           bodies={"Q1": b"b", "Q2": b"c"}))
    assert [m.queue_id for m in spool.load().messages] == ["Q1"]


def test_damaged_record_is_quarantined_not_deleted(spool: SqliteSpool, tmp_path: Path) -> None:
    spool.commit(Batch(stores=[message("GOOD", ["a@x.test"]), message("BAD", ["b@x.test"]),
                               message("ORPHAN", ["c@x.test"]), message("TYPES", ["d@x.test"])],
                       bodies={"GOOD": b"fine", "BAD": b"original body", "ORPHAN": b"o", "TYPES": b"t"}))
    db = sqlite3.connect(tmp_path / "shard-0" / "spool.sqlite3")
    db.execute("UPDATE messages SET body=? WHERE queue_id='BAD'", (b"flipped bits",))
    db.execute("DELETE FROM messages WHERE queue_id='ORPHAN'")
    db.execute("UPDATE recipients SET attempts='many' WHERE queue_id='TYPES'")
    db.commit()
    db.close()
    loaded = spool.load()
    # The body is not read at load: BAD is loaded, and found out when its body is read for delivery.
    assert [m.queue_id for m in loaded.messages] == ["BAD", "GOOD"]
    reasons = {q.queue_id: q.reason for q in loaded.quarantined}
    assert reasons == {"ORPHAN": "recipients without a message record", "TYPES": "recipient row has bad values"}
    bodies = spool.read_bodies(["GOOD", "BAD", "GONE"])
    assert bodies == {"GOOD": b"fine"} and bodies.damaged == {"BAD": "checksum mismatch"}
    spool.quarantine("BAD", "checksum mismatch")
    kept = msgpack.unpackb((tmp_path / "shard-0" / "quarantine" / "BAD.msgpack").read_bytes())
    assert kept["reason"] == "checksum mismatch" and b"flipped bits" in kept["message"]
    assert kept["recipients"][0][2] == "b@x.test"
    again = spool.load()
    assert again.quarantined == [] and [m.queue_id for m in again.messages] == ["GOOD"]  # moved aside once


def test_a_changed_recipient_address_fails_the_checksum_when_the_body_is_read(spool: SqliteSpool,
                                                                             tmp_path: Path) -> None:
    spool.commit(Batch(stores=[message("Q1", ["a@x.test"])], bodies={"Q1": b"body"}))
    db = sqlite3.connect(tmp_path / "shard-0" / "spool.sqlite3")
    db.execute("UPDATE recipients SET address='evil@x.test' WHERE queue_id='Q1'")
    db.commit()
    db.close()
    bodies = spool.read_bodies(["Q1"])
    assert bodies == {} and bodies.damaged == {"Q1": "checksum mismatch"}


def test_a_reader_sees_the_spool_as_it_was_when_it_was_made(spool: SqliteSpool) -> None:
    spool.commit(Batch(stores=[message(f"Q{n}", [f"r{n}@x.test"]) for n in range(5)],
                       bodies={f"Q{n}": b"b" for n in range(5)}))
    reader = spool.reader()
    assert reader.total == 5
    first = reader.read(2)
    assert first is not None and [m.queue_id for m in first.messages] == ["Q0", "Q1"]
    # Committed meanwhile (new mail, a finished message): not seen by the reader, read by the next one.
    spool.commit(Batch(stores=[message("Q9", ["new@x.test"])], bodies={"Q9": b"n"}, removals=["Q3"]))
    rest = reader.read(2), reader.read(2), reader.read(2)
    assert [[m.queue_id for m in part.messages] if part else None for part in rest] == [["Q2", "Q3"], ["Q4"], None]
    reader.close()
    assert [m.queue_id for m in spool.load().messages] == ["Q0", "Q1", "Q2", "Q4", "Q9"]


def test_queue_ids_are_unique_short_and_sorted() -> None:
    factory = QueueIdFactory(3)
    ids = [factory.new(1_700_000_000.0 + i / 10_000) for i in range(5000)]
    assert len(set(ids)) == 5000 and ids == sorted(ids)
    assert all(len(i) == 16 and i.endswith("03") and i.isalnum() for i in ids)
    other = QueueIdFactory(3)
    assert other.new(1_700_000_100.0) > ids[-1]
    # The digits are base32 of the milliseconds (10) and the sequence (4), most significant first.
    stamp = int(1_700_000_000.0 * 1000)
    assert ids[0][:10] == "".join("0123456789ABCDEFGHJKMNPQRSTVWXYZ"[(stamp >> (5 * i)) & 31] for i in range(9, -1, -1))


def test_free_space_is_reported(spool: SqliteSpool) -> None:
    assert spool.free_space() > 0


def test_unwritable_spool_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot open the spool"):
        SqliteSpool(blocker / "shard-0").open()


def test_one_process_per_spool(spool: SqliteSpool, tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="in use by another process"):
        SqliteSpool(tmp_path / "shard-0").open()
    spool.close()
    again = SqliteSpool(tmp_path / "shard-0")
    again.open()
    again.close()


OLD_SCHEMA = """
CREATE TABLE messages (queue_id TEXT PRIMARY KEY, sender TEXT NOT NULL, arrival REAL NOT NULL, size INTEGER NOT NULL,
    client TEXT NOT NULL, warned INTEGER NOT NULL DEFAULT 0, forward_shard INTEGER NOT NULL DEFAULT -1,
    checksum TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE recipients (queue_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0, last_reply TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT '', PRIMARY KEY (queue_id, idx)) WITHOUT ROWID;
"""


def test_a_spool_of_the_previous_release_loads_with_typed_outcomes(tmp_path: Path) -> None:
    """Rows written when the last outcome was one string are read once into their fields, then written typed."""
    directory = tmp_path / "shard-0"
    directory.mkdir()
    db = sqlite3.connect(directory / "spool.sqlite3")
    db.executescript(OLD_SCHEMA)
    addresses = ["a@x.test", "b@y.test", "c@z.test", "d@w.test"]
    db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, 0, -1, ?, ?)",
               ("Q1", "s@sender.test", 1.5, 4, "{}", checksum("s@sender.test", 1.5, b"body", addresses), b"body"))
    db.executemany("INSERT INTO recipients VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
        ("Q1", 0, "a@x.test", "deferred", 1, 99.0, "421 4.4.2 try later", "mx.x.test[192.0.2.1]"),
        ("Q1", 1, "b@y.test", "ready", 0, 0.0, "", ""),
        ("Q1", 2, "c@z.test", "failed", 3, 0.0, "451 4.4.7 delivery time expired; last error: 451 busy", ""),
        ("Q1", 3, "d@w.test", "failed", 0, 0.0, "deleted by the queue administrator", "")])
    db.commit()
    db.close()
    spool = SqliteSpool(directory)
    spool.open()
    (loaded,) = spool.load().messages
    assert [r.last for r in loaded.recipients] == [
        LastOutcome(OutcomeKind.DEFERRED, 421, "4.4.2", "try later", "mx.x.test[192.0.2.1]"), None,
        LastOutcome(OutcomeKind.EXPIRED, 451, "4.4.7", "delivery time expired; last error: 451 busy"),
        LastOutcome(OutcomeKind.FAILED, 0, "", "deleted by the queue administrator")]
    sent = LastOutcome(OutcomeKind.DELIVERED, 250, "2.0.0", "ok", "mx.y.test[192.0.2.2]")
    spool.commit(Batch(updates=[RecipientUpdate("Q1", 1, State.DELIVERED, 1, 0.0, sent)]))
    assert spool.load().messages[0].recipients[1].last == sent
    spool.close()


def test_destination_backoffs_are_stored_and_ended(spool: SqliteSpool, tmp_path: Path) -> None:
    spool.commit(Batch(backoffs={"down.test": 1_700_000_300.0, "slow.test": 1_700_000_600.0}))
    spool.commit(Batch(backoffs={"slow.test": 0.0}))  # ended
    spool.close()
    reopened = SqliteSpool(tmp_path / "shard-0")
    reopened.open()
    assert reopened.load().backoffs == {"down.test": 1_700_000_300.0}
    reopened.close()


def test_a_new_spool_packs_small_messages_and_shrinks_when_drained(spool: SqliteSpool, tmp_path: Path) -> None:
    """Issue 11: 4 KiB pages held one 2 KiB message each (1.8x the data), and the file never shrank."""
    assert spool.db.execute("PRAGMA page_size").fetchone()[0] == 16384
    body = b"x" * 2048
    queue_ids = [f"Q{n:05d}" for n in range(2000)]
    spool.commit(Batch(stores=[message(q, ["a@x.test"]) for q in queue_ids], bodies=dict.fromkeys(queue_ids, body)))
    spool.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    database = tmp_path / "shard-0" / "spool.sqlite3"
    full = database.stat().st_size
    assert full < 1.3 * len(queue_ids) * len(body)
    for start in range(0, len(queue_ids), 100):  # delivered in batches, as a shard removes finished mail
        spool.commit(Batch(removals=queue_ids[start:start + 100]))
    spool.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert database.stat().st_size < full / 4


def older_layout_spool(directory: Path, body: bytes, client: str, row_checksum: str) -> None:
    """A spool file of an older layout (4 KiB pages, no body_file column) holding message Q1 for a@x.test."""
    directory.mkdir()
    db = sqlite3.connect(directory / "spool.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, 0, -1, ?, ?)",
               ("Q1", "s@sender.test", 1.5, len(body), client, row_checksum, body))
    db.execute("INSERT INTO recipients VALUES ('Q1', 0, 'a@x.test', 'ready', 0, 0.0, '', '')")
    db.commit()
    db.close()


def test_a_spool_of_an_older_layout_keeps_its_pages_and_loads(tmp_path: Path) -> None:
    directory = tmp_path / "shard-0"
    older_layout_spool(directory, b"body", '{"ip": "192.0.2.1"}',
                       checksum("s@sender.test", 1.5, b"body", ["a@x.test"]))
    spool = SqliteSpool(directory)
    spool.open()
    assert spool.db.execute("PRAGMA page_size").fetchone()[0] == 4096
    loaded = spool.load()
    assert [m.queue_id for m in loaded.messages] == ["Q1"] and loaded.backoffs == {}
    assert loaded.messages[0].client == {"ip": "192.0.2.1"}
    spool.commit(Batch(removals=["Q1"]))  # incremental vacuum is a no-op on this layout, not an error
    spool.close()


BIG = b"big body line\r\n" * (BODY_FILE_MIN // 15 + 1)


def body_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "shard-0" / BODIES).iterdir())


def test_a_big_body_is_kept_in_a_file_beside_its_row_and_unlinked_with_it(spool: SqliteSpool, tmp_path: Path) -> None:
    spool.commit(Batch(stores=[message("BIG1", ["a@x.test"]), message("SMALL", ["b@x.test"])],
                       bodies={"BIG1": BIG, "SMALL": b"small"}))
    assert body_files(tmp_path) == ["BIG1"]
    assert (tmp_path / "shard-0" / BODIES / "BIG1").read_bytes() == BIG
    row = spool.db.execute("SELECT length(body), body_file FROM messages WHERE queue_id='BIG1'").fetchone()
    assert row == (0, 1)
    assert spool.read_bodies(["BIG1", "SMALL"]) == {"BIG1": BIG, "SMALL": b"small"}
    assert spool.read_headers("BIG1") == BIG  # no blank line: the whole body
    # A duplicate store of BIG1 fails, and leaves its file as it was.
    with pytest.raises(SpoolError):
        spool.commit(Batch(stores=[message("BIG1", ["dup@x.test"])], bodies={"BIG1": BIG[::-1]}))
    assert spool.read_bodies(["BIG1"]) == {"BIG1": BIG}
    spool.commit(Batch(removals=["BIG1", "SMALL"]))
    assert body_files(tmp_path) == []


def test_body_files_without_a_row_are_removed_at_open(spool: SqliteSpool, tmp_path: Path) -> None:
    """A crash after the file was written and before its row was committed (or after the row was removed and
    before its file was unlinked) leaves a file that no row names."""
    spool.commit(Batch(stores=[message("KEPT", ["a@x.test"])], bodies={"KEPT": BIG}))
    spool.close()
    (tmp_path / "shard-0" / BODIES / "LEFTOVER").write_bytes(BIG)
    reopened = SqliteSpool(tmp_path / "shard-0")
    reopened.open()
    assert body_files(tmp_path) == ["KEPT"]
    assert reopened.read_bodies(["KEPT"]) == {"KEPT": BIG}
    reopened.commit(Batch(removals=["KEPT"]))  # known as a file body after the reopen: unlinked
    assert body_files(tmp_path) == []
    reopened.close()


def test_a_row_that_cannot_be_bound_leaves_no_body_file(spool: SqliteSpool, tmp_path: Path) -> None:
    """An error that is not SQLite's (here a number SQLite cannot hold) rolls the transaction back and
    removes the body files it wrote at once, not at the next start's sweep."""
    odd = message("ODD", ["a@x.test"])
    odd.recipients[0].attempts = 2 ** 70
    with pytest.raises(OverflowError):
        spool.commit(Batch(stores=[message("BIG2", ["b@x.test"]), odd], bodies={"BIG2": BIG, "ODD": BIG}))
    assert body_files(tmp_path) == []
    assert spool.load().messages == []
    spool.commit(Batch(stores=[message("BIG2", ["b@x.test"])], bodies={"BIG2": BIG}))  # the spool goes on
    assert body_files(tmp_path) == ["BIG2"] and spool.read_bodies(["BIG2"]) == {"BIG2": BIG}


def test_a_new_spool_directory_is_made_durable_in_its_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard directory's own entry lives in its parent: fsynced when the directory is created (each
    directory created on the way too), so a power loss cannot take the whole spool away after a Stored."""
    synced: list[str] = []
    fsync = os.fsync

    def recording(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    root = tmp_path.resolve()
    spool = SqliteSpool(root / "spool" / "shard-0")
    spool.open()
    spool.close()
    assert str(root) in synced and str(root / "spool") in synced
    synced.clear()
    again = SqliteSpool(root / "spool" / "shard-0")  # an existing directory: nothing more to do for it
    again.open()
    again.close()
    assert str(root) not in synced and str(root / "spool") not in synced


def test_a_damaged_or_missing_body_file_is_a_damaged_record(spool: SqliteSpool, tmp_path: Path) -> None:
    spool.commit(Batch(stores=[message("FLIPPED", ["a@x.test"]), message("GONE", ["b@x.test"])],
                       bodies={"FLIPPED": BIG, "GONE": BIG}))
    (tmp_path / "shard-0" / BODIES / "FLIPPED").write_bytes(BIG[:-3] + b"x\r\n")
    (tmp_path / "shard-0" / BODIES / "GONE").unlink()
    bodies = spool.read_bodies(["FLIPPED", "GONE"])
    assert bodies == {} and bodies.damaged == {"FLIPPED": "checksum mismatch", "GONE": "body file is missing"}
    spool.quarantine("FLIPPED", "checksum mismatch")
    assert (tmp_path / "shard-0" / "quarantine" / "FLIPPED.body").read_bytes().endswith(b"x\r\n")
    assert body_files(tmp_path) == []
    assert [m.queue_id for m in spool.load().messages] == ["GONE"]


def test_new_rows_carry_a_crc32_and_rows_of_the_previous_release_still_verify(spool: SqliteSpool,
                                                                               tmp_path: Path) -> None:
    addresses = ["a@x.test"]
    spool.commit(Batch(stores=[message("NEW", addresses), message("OLD", addresses), message("OLDBAD", addresses)],
                       bodies={"NEW": b"body", "OLD": b"body", "OLDBAD": b"body"}))
    (stored,) = spool.db.execute("SELECT checksum FROM messages WHERE queue_id='NEW'").fetchone()
    assert stored == checksum("s@sender.test", 1_700_000_000.5, b"body", addresses)
    assert re.fullmatch(r"crc32:[0-9a-f]{8}", stored)
    legacy = legacy_checksum("s@sender.test", 1_700_000_000.5, b"body", addresses)
    assert re.fullmatch(r"[0-9a-f]{32}", legacy)
    spool.db.execute("UPDATE messages SET checksum=? WHERE queue_id IN ('OLD', 'OLDBAD')", (legacy,))
    spool.db.execute("UPDATE messages SET body=? WHERE queue_id='OLDBAD'", (b"bodY",))
    bodies = spool.read_bodies(["NEW", "OLD", "OLDBAD"])
    assert bodies == {"NEW": b"body", "OLD": b"body"} and bodies.damaged == {"OLDBAD": "checksum mismatch"}


def test_a_spool_without_the_body_file_column_gets_it_and_reads_its_bodies(tmp_path: Path) -> None:
    directory = tmp_path / "shard-0"
    older_layout_spool(directory, BIG, "{}", legacy_checksum("s@sender.test", 1.5, BIG, ["a@x.test"]))
    spool = SqliteSpool(directory)
    spool.open()
    assert spool.read_bodies(["Q1"]) == {"Q1": BIG}
    spool.commit(Batch(removals=["Q1"]))
    assert spool.load().messages == []
    spool.close()


def test_client_facts_text_is_the_compact_sorted_json_and_per_message_facts_are_not_remembered() -> None:
    """Issue 12: a frontend's facts carry a trace id per message, so their text is not kept for reuse (it would
    only churn the table); any facts give the compact, sorted JSON that the spool stores."""
    from cluster.queue import records

    facts = {"ip": "192.0.2.1", "helo": "client.test", "protocol": "ESMTP", "trace_id": "T1"}
    before = dict(records._client_texts)
    text = records.client_text(facts)
    assert text == json.dumps(facts, separators=(",", ":"), sort_keys=True)
    assert records._client_texts == before
    shared = {"ip": "192.0.2.1", "helo": "client.test"}
    first, second = records.client_text(shared), records.client_text(dict(shared))
    assert first is second and first == '{"helo":"client.test","ip":"192.0.2.1"}'
    assert Message("Q", "", 0.0, [Recipient(0, "a@b.test")], 1, facts).client == facts


def test_the_log_is_checkpointed_in_the_background_never_in_a_write(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A write on the event loop must not copy the log into the database (a checkpoint: two fsyncs and megabytes
    of copying); the spool's fsync starts one in a thread of its own once the log is long enough."""
    monkeypatch.setattr("cluster.queue.spool.CHECKPOINT_PAGES", 200)
    spool = SqliteSpool(tmp_path / "shard-0")
    spool.open()
    database = tmp_path / "shard-0" / "spool.sqlite3"
    try:
        before = database.stat().st_size
        body = b"x" * (100 * 1024)  # below BODY_FILE_MIN: in the log
        assert len(body) < BODY_FILE_MIN
        for i in range(200):  # ~1,300 pages of 16 KiB: past SQLite's own automatic checkpoint (1,000 pages)
            spool.write(Batch(stores=[message(f"Q{i:03}", ["a@x.test"])], bodies={f"Q{i:03}": body}))
        assert database.stat().st_size == before  # all of it is in the log
        spool.sync()
        deadline = time.monotonic() + 10
        while database.stat().st_size < 200 * len(body) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert database.stat().st_size >= 200 * len(body)  # copied by the background checkpoint
        assert len(spool.load().messages) == 200
        # The log file keeps its size, but what it holds was copied: a small transaction starts no checkpoint.
        checkpoint = spool._checkpointing
        assert checkpoint is not None
        checkpoint.result(timeout=10)
        spool.commit(Batch(stores=[message("Q99", ["a@x.test"])], bodies={"Q99": b"small"}))
        assert spool._checkpointing is checkpoint
    finally:
        spool.close()


def test_the_log_starts_over_instead_of_growing_while_the_shard_commits(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The log is written from its start again only when a write finds all of it copied; a background checkpoint
    always lags the next write, so without the spool copying the last pages itself the log grows for ever."""
    monkeypatch.setattr("cluster.queue.spool.CHECKPOINT_PAGES", 100)
    monkeypatch.setattr("cluster.queue.spool.WAL_RESTART_BYTES", 1024 * 1024)
    spool = SqliteSpool(tmp_path / "shard-0")
    spool.open()
    wal = tmp_path / "shard-0" / "spool.sqlite3-wal"
    body = b"y" * (20 * 1024)
    largest = 0
    try:
        for i in range(600):  # ~12 MiB through the log, one transaction each, as the committer does
            spool.commit(Batch(stores=[message(f"Q{i:04}", ["a@x.test"])], bodies={f"Q{i:04}": body}))
            largest = max(largest, wal.stat().st_size)
        assert largest < 6 * 1024 * 1024, largest
        assert len(spool.load().messages) == 600
    finally:
        spool.close()


def test_after_a_failed_fsync_nothing_more_is_written_until_the_spool_is_opened_again(
        spool: SqliteSpool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a failed writeback once: a later fsync may succeed although the pages of the earlier
    transactions never reached the disk, so calling anything durable after a failure could lose acknowledged mail."""
    import cluster.queue.spool as spool_module

    real = spool_module.os.fdatasync
    failures = iter([OSError(5, "Input/output error")])

    def failing_once(descriptor: int) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real(descriptor)

    monkeypatch.setattr(spool_module.os, "fdatasync", failing_once)
    with pytest.raises(SpoolError, match="fsync"):
        spool.commit(Batch(stores=[message("Q1", ["a@x.test"])], bodies={"Q1": b"one"}))
    with pytest.raises(SpoolError, match="restart the shard"):
        spool.write(Batch(stores=[message("Q2", ["a@x.test"])], bodies={"Q2": b"two"}))
    with pytest.raises(SpoolError, match="restart the shard"):
        spool.sync()
    spool.close()
    reopened = SqliteSpool(tmp_path / "shard-0")
    reopened.open()
    try:
        reopened.commit(Batch(stores=[message("Q3", ["a@x.test"])], bodies={"Q3": b"three"}))
        assert "Q3" in {m.queue_id for m in reopened.load().messages}
    finally:
        reopened.close()


def test_once_the_log_started_over_small_commits_do_not_each_copy_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The log file keeps its size after it starts over: judged by that size, every sync after the first
    WAL_RESTART_BYTES of log copied the log itself (a checkpoint, two more fsyncs, per transaction). Judged by
    the frames written since the log started over, a copy comes once per WAL_RESTART_BYTES of log."""
    monkeypatch.setattr("cluster.queue.spool.CHECKPOINT_PAGES", 100)
    monkeypatch.setattr("cluster.queue.spool.WAL_RESTART_BYTES", 1024 * 1024)
    copies = 0
    real = SqliteSpool._checkpoint

    def counted(self: SqliteSpool) -> None:
        nonlocal copies
        copies += 1
        real(self)

    monkeypatch.setattr(SqliteSpool, "_checkpoint", counted)
    spool = SqliteSpool(tmp_path / "shard-0")
    spool.open()
    wal = tmp_path / "shard-0" / "spool.sqlite3-wal"
    try:
        body = b"z" * 4096
        for i in range(200):  # past WAL_RESTART_BYTES, so the log file stays longer than that from here on
            spool.commit(Batch(stores=[message(f"A{i:04}", ["a@x.test"])], bodies={f"A{i:04}": b"y" * 20_000}))
        assert wal.stat().st_size > 1024 * 1024
        checkpoint = spool._checkpointing
        if checkpoint is not None:
            checkpoint.result(timeout=10)
        copies = 0
        for i in range(300):  # one small message stored and the one before removed per transaction
            removals = [f"Q{i - 1:04}"] if i else []
            spool.commit(Batch(stores=[message(f"Q{i:04}", ["a@x.test"])], bodies={f"Q{i:04}": body},
                               removals=removals))
        # ~2 pages per transaction: the log reaches 1 MiB about every 30 transactions
        assert copies <= 30, copies
        assert len(spool.load().messages) == 200 + 1
    finally:
        spool.close()


@pytest.mark.parametrize("addresses", [[], ["a@x.test"], ["a@x.test", "b\udcff@y.test", "ünï@zé.test"] * 40])
def test_the_checksum_head_is_the_same_bytes_as_the_one_rows_were_written_with(addresses: list[str]) -> None:
    """Rows already in a spool carry checksums over these bytes: a cheaper way to build them must give the same."""
    from cluster.queue.spool import _checksum_head

    sender, arrival = "s\udce9@sender.test", 1_700_000_000.25
    written = b"".join([sender.encode("utf-8", "surrogateescape"), b"\0", repr(arrival).encode(), b"\0",
                        *(a.encode("utf-8", "surrogateescape") + b"\0" for a in addresses)])
    assert _checksum_head(sender, arrival, addresses) == written
    assert _checksum_head(sender, arrival, iter(addresses)) == written
