"""The users file: who may log in (SMTP AUTH to relay, POP3 to fetch mail), with scrypt password hashes.

Format, one user a line (blank lines and "#" comments allowed):

    alice@example.org:scrypt$16384$8$1$<salt base64>$<hash base64>

`mtacluster user add NAME` writes a line (asking for the password), `user remove NAME` deletes it,
`user list` prints the names. The file is re-read when its modification time changes, so a running cluster
picks up changes without a restart. Passwords are never logged and never stored in clear.
Failure modes: a malformed line is reported with its line number (`UsersFileError`) and no user is accepted
from a file that does not parse.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# scrypt cost (RFC 7914): N=2^14, r=8, p=1 takes about 50 ms and 16 MiB, a common interactive-login choice.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
_NAME = re.compile(r"[^\s:#]{1,255}")


class UsersFileError(ValueError):
    """The users file cannot be read or has a malformed line."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return (f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
            f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_text, digest_text = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_text), base64.b64decode(digest_text)
        digest = hashlib.scrypt(password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


def parse_users(text: str, source: str = "users file") -> dict[str, str]:
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not valid_name(name) or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise UsersFileError(f"{source}:{number}: expected 'name:scrypt$N$r$p$salt$hash'")
        users[name.lower()] = stored
    return users


@dataclass
class UserDatabase:
    """The users file, re-read when it changes. An empty path means: nobody can log in."""

    path: str
    _users: dict[str, str] = field(default_factory=dict)
    _stamp: tuple[float, int] | None = None

    def _refresh(self) -> None:
        if not self.path:
            return
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise UsersFileError(f"{self.path}: cannot read: {exc.strerror}") from None
        stamp = (stat.st_mtime, stat.st_size)
        if stamp != self._stamp:
            self._users = parse_users(Path(self.path).read_text(), self.path)
            self._stamp = stamp

    def names(self) -> list[str]:
        self._refresh()
        return sorted(self._users)

    def verify(self, name: str, password: str) -> bool:
        """True when `name` exists and `password` is its password. Costs one scrypt even for unknown names."""
        self._refresh()
        stored = self._users.get(name.lower())
        if stored is None:
            check_password(password, _DUMMY_HASH)  # same time for unknown users: no name probing by timing
            return False
        return check_password(password, stored)


_DUMMY_HASH = hash_password("not a real password", salt=b"\0" * 16)


def add_user(path: str, name: str, password: str) -> None:
    """Add or replace a user in the users file (created with mode 0600 if missing)."""
    if not valid_name(name):
        raise UsersFileError(f"{name!r} is not a valid user name (no spaces, ':' or '#')")
    text = Path(path).read_text() if os.path.exists(path) else ""
    parse_users(text, path)
    kept = [line for line in text.splitlines() if line.partition(":")[0].strip().lower() != name.lower()]
    kept.append(f"{name}:{hash_password(password)}")
    _write(path, "\n".join(kept) + "\n")


def remove_user(path: str, name: str) -> bool:
    text = Path(path).read_text()
    lines = text.splitlines()
    kept = [line for line in lines if line.partition(":")[0].strip().lower() != name.lower()]
    if len(kept) == len(lines):
        return False
    _write(path, "\n".join(kept) + "\n")
    return True


def _write(path: str, text: str) -> None:
    temporary = f"{path}.tmp.{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
