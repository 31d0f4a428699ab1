"""Maildir delivery for the `local` transport: atomic, byte-exact after the Return-Path line, safe names."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster.bus.schemas import Deliver
from cluster.config import config_from_dict
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.deliver import Deliverer
from cluster.delivery.mx import StaticMxResolver
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


async def test_local_transport_delivers_and_reports(tmp_path: Path) -> None:
    config = config_from_dict({"delivery": {"transports": {"local.test": "local"},
                                            "maildir_root": str(tmp_path)}}, environ={})
    deliverer = Deliverer(config, StaticMxResolver({}), ConnectionCache(30, 100), rng=random.Random(0))
    job = Deliver(job_id="j", queue_id="q", sender="s@o.test", recipients=["u1@local.test", "../x@local.test"],
                  domain="local.test", body=BODY, attempt=1)
    ok, bad = await deliverer.deliver(job)
    assert (ok.kind, ok.code, ok.remote) == ("delivered", 250, "local")
    assert (bad.kind, bad.code, bad.enhanced) == ("failed", 550, "5.1.3")
    (path,) = (tmp_path / "u1" / "new").iterdir()
    assert path.read_bytes().endswith(BODY)


async def test_unwritable_root_defers(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = config_from_dict({"delivery": {"transports": {"local.test": "local"},
                                            "maildir_root": str(blocker)}}, environ={})
    deliverer = Deliverer(config, StaticMxResolver({}), ConnectionCache(30, 100))
    job = Deliver(job_id="j", queue_id="q", sender="s@o.test", recipients=["u@local.test"], domain="local.test",
                  body=BODY, attempt=1)
    (outcome,) = await deliverer.deliver(job)
    assert (outcome.kind, outcome.code, outcome.enhanced) == ("deferred", 451, "4.3.0")
