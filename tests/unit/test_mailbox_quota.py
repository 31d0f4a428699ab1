"""Mailbox quotas without sockets: usage of a Maildir, the per-user override, and the 452/552 decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import config_from_dict
from cluster.mailbox.maildir import MaildirStore
from cluster.mailbox.quota import Verdict, effective_quota, mailbox_usage, maildir_usage, quota_override, verdict
from cluster.users import UserDatabase, UsersFileError, add_user, hash_password

HASH = hash_password("x")


def test_verdict_over_quota_now_versus_never_fits() -> None:
    assert verdict(0, 10**12, 10**9) is Verdict.FITS  # 0: no quota
    assert verdict(1000, 400, 600) is Verdict.FITS
    assert verdict(1000, 401, 600) is Verdict.OVER_QUOTA  # 452 4.2.2: deleting mail makes room
    assert verdict(1000, 0, 1001) is Verdict.NEVER_FITS  # 552 5.2.2: nothing the user does makes room


def test_usage_counts_new_and_cur_but_not_tmp(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path, "h")
    first = store.deliver("alice", "s@x.test", b"12345\r\n")
    store.deliver("alice", "s@x.test", b"678\r\n")
    first.rename(tmp_path / "alice" / "cur" / f"{first.name}:2,")
    (tmp_path / "alice" / "tmp" / "half-written").write_bytes(b"x" * 1000)
    messages, octets = maildir_usage(tmp_path / "alice")
    assert messages == 2 and octets == sum(len(f"Return-Path: <s@x.test>\r\n{b}") for b in ("12345\r\n", "678\r\n"))
    assert maildir_usage(tmp_path / "nobody") == (0, 0)


def test_the_users_file_overrides_the_quota_per_mailbox(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f'[users."alice@example.org"]\npassword = "{HASH}"\nmailbox_quota = "1MiB"\n\n'
                     f'[users."bob@example.org"]\npassword = "{HASH}"\n')
    database = UserDatabase(str(users))
    assert quota_override(database, "alice") == 2**20
    assert quota_override(database, "bob") is None
    assert effective_quota(5000, database, "bob") == 5000 and effective_quota(5000, database, "alice") == 2**20
    users.write_text(f'[users."alice@example.org"]\npassword = "{HASH}"\nmailbox_quota = "lots"\n')
    with pytest.raises(UsersFileError, match="mailbox_quota"):
        quota_override(UserDatabase(str(users)), "alice")
    old_format = tmp_path / "old-users"
    add_user(str(old_format), "alice@example.org", "x")
    assert quota_override(UserDatabase(str(old_format)), "alice") is None
    assert quota_override(UserDatabase(""), "alice") is None


def test_mailbox_usage_is_what_user_show_prints(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f'[users."carol@example.org"]\npassword = "{HASH}"\nmailbox_quota = 4096\n')
    config = config_from_dict({"mailbox": {"maildir_root": str(tmp_path / "md"), "quota": "1MiB"},
                               "auth": {"users_file": str(users)}}, environ={})
    MaildirStore(tmp_path / "md", "h").deliver("carol", "s@x.test", b"hello\r\n")
    usage = mailbox_usage(config, "Carol@example.org")
    assert (usage.messages, usage.quota) == (1, 4096) and usage.octets > 0
    assert mailbox_usage(config, "dave").quota == 2**20
