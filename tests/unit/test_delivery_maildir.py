"""Maildir storage of the mailbox role: atomic, byte-exact after the Return-Path line, safe names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.mailbox.maildir import MailboxNameError, MaildirStore, mailbox_name

BODY = b"Received: from x\r\nSubject: local\r\n\r\n.dot stays single here\r\n\xc3\xa9\r\n"


def test_delivery_writes_into_new_with_return_path(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path, "host.test")
    path = store.deliver("Alice", "bob@example.org", BODY)
    assert path.parent == tmp_path / "alice" / "new"
    assert path.read_bytes() == b"Return-Path: <bob@example.org>\r\n" + BODY
    assert list((tmp_path / "alice" / "tmp").iterdir()) == []
    assert (tmp_path / "alice" / "cur").is_dir()
    second = store.deliver("alice", "", BODY)
    assert second != path and second.read_bytes().startswith(b"Return-Path: <>\r\n")


@pytest.mark.parametrize("bad", ["", "..", ".hidden", "a/b", "a\\b", "x\0y"])
def test_unsafe_local_parts_are_refused(bad: str) -> None:
    with pytest.raises(MailboxNameError):
        mailbox_name(bad)


def test_quoted_local_part() -> None:
    assert mailbox_name('"John Smith"') == "john smith"
