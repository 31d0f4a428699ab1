"""The users file: scrypt hashes, parsing with line numbers, add/remove, reload on change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.users import UserDatabase, UsersFileError, add_user, check_password, hash_password, remove_user


def test_hash_and_check() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$")
    assert check_password("correct horse", stored)
    assert not check_password("wrong", stored)
    assert not check_password("x", "scrypt$garbage")
    assert hash_password("same") != hash_password("same")  # salted


def test_add_verify_remove_and_reload(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    add_user(path, "alice@example.org", "s3cret")
    assert os.stat(path).st_mode & 0o077 == 0
    database = UserDatabase(path)
    assert database.verify("Alice@Example.org", "s3cret")
    assert not database.verify("alice@example.org", "nope")
    assert not database.verify("bob@example.org", "s3cret")
    add_user(path, "bob@example.org", "hunter2")
    add_user(path, "alice@example.org", "changed")  # replaces, does not duplicate
    assert database.names() == ["alice@example.org", "bob@example.org"]
    assert database.verify("alice@example.org", "changed") and not database.verify("alice@example.org", "s3cret")
    assert remove_user(path, "bob@example.org")
    assert not remove_user(path, "bob@example.org")
    assert database.names() == ["alice@example.org"]
    assert "changed" not in Path(path).read_text()


def test_malformed_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# comment\n\nalice:plaintext\n")
    with pytest.raises(UsersFileError, match=":3:"):
        UserDatabase(str(path)).verify("alice", "plaintext")
    with pytest.raises(UsersFileError, match="not a valid user name"):
        add_user(str(tmp_path / "other"), "has space", "x")


def test_no_users_file_means_nobody() -> None:
    assert not UserDatabase("").verify("anyone", "anything")
