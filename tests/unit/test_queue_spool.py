"""The SQLite spool: store, recover, mark, remove, quarantine of damaged records."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from cluster.queue.records import Message, QueueIdFactory, Recipient, RecipientUpdate, State
from cluster.queue.spool import Batch, SpoolError, SqliteSpool


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


def test_mark_and_remove(spool: SqliteSpool) -> None:
    spool.commit(Batch(stores=[message("Q1", ["a@x.test", "b@y.test"])], bodies={"Q1": b"b"}))
    spool.commit(Batch(updates=[
        RecipientUpdate("Q1", 0, State.DELIVERED, 1, 0.0, "250 2.0.0 ok", "mx[192.0.2.1]"),
        RecipientUpdate("Q1", 1, State.DEFERRED, 2, 1234.5, "421 4.4.2 later", "")], flags={"Q1": (True, -1)}))
    loaded = spool.load().messages[0]
    assert loaded.warned
    assert [(r.state, r.attempts, r.next_attempt, r.last_reply, r.remote) for r in loaded.recipients] == [
        (State.DELIVERED, 1, 0.0, "250 2.0.0 ok", "mx[192.0.2.1]"), (State.DEFERRED, 2, 1234.5, "421 4.4.2 later", "")]
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
                               message("ORPHAN", ["c@x.test"])],
                       bodies={"GOOD": b"fine", "BAD": b"original body", "ORPHAN": b"o"}))
    db = sqlite3.connect(tmp_path / "shard-0" / "spool.sqlite3")
    db.execute("UPDATE messages SET body=? WHERE queue_id='BAD'", (b"flipped bits",))
    db.execute("DELETE FROM messages WHERE queue_id='ORPHAN'")
    db.commit()
    db.close()
    loaded = spool.load()
    assert [m.queue_id for m in loaded.messages] == ["GOOD"]
    reasons = {q.queue_id: q.reason for q in loaded.quarantined}
    assert reasons == {"BAD": "checksum mismatch", "ORPHAN": "recipients without a message record"}
    kept = msgpack.unpackb((tmp_path / "shard-0" / "quarantine" / "BAD.msgpack").read_bytes())
    assert kept["reason"] == "checksum mismatch" and b"flipped bits" in kept["message"]
    assert kept["recipients"][0][2] == "b@x.test"
    assert spool.load().quarantined == []  # moved aside once, not reported again


def test_queue_ids_are_unique_short_and_sorted() -> None:
    factory = QueueIdFactory(3)
    ids = [factory.new(1_700_000_000.0 + i / 10_000) for i in range(5000)]
    assert len(set(ids)) == 5000 and ids == sorted(ids)
    assert all(len(i) == 16 and i.endswith("03") and i.isalnum() for i in ids)
    other = QueueIdFactory(3)
    assert other.new(1_700_000_100.0) > ids[-1]


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
