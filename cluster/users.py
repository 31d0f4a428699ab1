"""The users file: the accounts of the cluster (SMTP AUTH to send, POP3 to fetch mail), scrypt password hashes.

Format: TOML, one table per account (written by `mtacluster user ...`; hand edits are fine):

    [users."alice@example.org"]
    password = "scrypt$16384$8$1$<salt base64>$<hash base64>"
    active = true                              # false: AUTH and POP3 refuse the account (default true)
    addresses = ["alice@example.net", "@example.org"]   # may send as these, besides its own name
    messages_per_day = 200                     # optional overrides of [limits] (0 = no limit)
    recipients_per_day = 1000
    mailbox_quota = "1GiB"                     # optional; read by the mailbox role

An account may send as its own name when the name is an address, and as every entry of `addresses`;
"@example.org" means any address in example.org (for admin accounts).
The old format, one `name:scrypt$...` line per user, still loads (every account active, no extra addresses, no
overrides); the first change made with `mtacluster user` rewrites the file in TOML.

The file is re-read when its modification time, size or inode changes, so a running cluster sees every change
at its next lookup, without a restart. Passwords are never logged and never stored in clear.
Failure modes: a malformed file raises `UsersFileError` naming the file (and line, or account and key); no
account is accepted from a file that does not parse.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster.bus.ring import domain_key

# scrypt cost (RFC 7914): N=2^14, r=8, p=1 takes about 50 ms and 16 MiB, a common interactive-login choice.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
# `mtacluster user add` refuses shorter passwords (NIST SP 800-63B 5.1.1.2: at least 8 characters).
MIN_PASSWORD_LENGTH = 8
_NAME = re.compile(r"[^\s:#\"\\]{1,255}")
_OLD_LINE = re.compile(r"[^\s:#=\[]{1,255}:")
_SIZE = re.compile(r"^\s*([0-9]+)\s*(|[kKmMgGtT]i?[bB]?)\s*$")
_SIZE_FACTORS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
                 "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_KEYS = {"password", "active", "addresses", "messages_per_day", "recipients_per_day", "mailbox_quota"}


class UsersFileError(ValueError):
    """The users file cannot be read or is malformed."""


class AuthOutcome(enum.StrEnum):
    """Why a login succeeded or not: the log says it, the client only hears ok or not (no enumeration)."""

    OK = "ok"
    BAD_PASSWORD = "bad_password"
    UNKNOWN_USER = "unknown_user"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Account:
    name: str
    password_hash: str = field(repr=False)
    active: bool = True
    addresses: tuple[str, ...] = ()
    # None: the [limits] default applies; 0: no limit for this account.
    messages_per_day: int | None = None
    recipients_per_day: int | None = None
    # Bytes; None: the mailbox role's default.
    mailbox_quota: int | None = None

    def sender_addresses(self) -> tuple[str, ...]:
        """Every address (or "@domain") this account may use in MAIL FROM."""
        own = (self.name,) if "@" in self.name.strip("@") else ()
        return own + self.addresses

    def may_send_as(self, address: str) -> bool:
        """True when `address` (a MAIL FROM path) is one of this account's addresses, or in one of its domains."""
        local, at, domain = address.rpartition("@")
        if not at:
            return False
        wanted = f"{local.lower()}@{domain_key(domain)}"
        for allowed in self.sender_addresses():
            allowed_local, _, allowed_domain = allowed.rpartition("@")
            if not allowed_local and domain_key(allowed_domain) == domain_key(domain):
                return True
            if f"{allowed_local.lower()}@{domain_key(allowed_domain)}" == wanted:
                return True
        return False

    def receives(self, address: str) -> bool:
        """True when mail to `address` is for this account: its own name or one of its full addresses."""
        wanted = _normal_address(address)
        return wanted == _normal_address(self.name) or any(
            wanted == _normal_address(a) for a in self.addresses if not a.startswith("@"))


def _normal_address(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local.lower()}@{domain_key(domain)}" if at else domain.lower()


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


def valid_sender_address(address: str) -> bool:
    """An address an account may be given: "local@domain" or "@domain", no spaces or quotes."""
    local, at, domain = address.rpartition("@")
    return bool(at and domain and "." in domain.strip(".") and valid_name(address) and "@" not in local)


def parse_size(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower().removesuffix("b")
        return int(m.group(1)) * _SIZE_FACTORS[unit]
    raise UsersFileError(f"{where}: expected a size such as 1073741824 or \"1GiB\", got {value!r}")


def _old_format(text: str) -> bool:
    """Lines of "name:..." (the format before TOML); such text is never valid TOML."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return bool(lines) and all(_OLD_LINE.match(line) for line in lines)


def _parse_old(text: str, source: str) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not valid_name(name) or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise UsersFileError(f"{source}:{number}: expected 'name:scrypt$N$r$p$salt$hash'")
        accounts[name.lower()] = Account(name, stored)
    return accounts


def _limit(entry: dict[str, Any], key: str, where: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsersFileError(f"{where}.{key}: expected a whole number >= 0, got {value!r}")
    return value


def _account(name: str, entry: object, source: str) -> Account:
    where = f"{source}: users.{json.dumps(name)}"
    if not valid_name(name):
        raise UsersFileError(f"{where}: not a valid user name (no spaces, ':', '#' or quotes)")
    if not isinstance(entry, dict):
        raise UsersFileError(f"{where}: expected a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise UsersFileError(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(_KEYS))})")
    stored = entry.get("password")
    if not isinstance(stored, str) or not stored.startswith("scrypt$") or stored.count("$") != 5:
        raise UsersFileError(f"{where}.password: expected 'scrypt$N$r$p$salt$hash'")
    active = entry.get("active", True)
    if not isinstance(active, bool):
        raise UsersFileError(f"{where}.active: expected true or false, got {active!r}")
    addresses = entry.get("addresses", [])
    if not isinstance(addresses, list) or not all(isinstance(a, str) and valid_sender_address(a) for a in addresses):
        raise UsersFileError(f"{where}.addresses: expected a list of addresses (\"a@example.org\" or "
                             f"\"@example.org\"), got {addresses!r}")
    quota = entry.get("mailbox_quota")
    return Account(name, stored, active, tuple(addresses), _limit(entry, "messages_per_day", where),
                   _limit(entry, "recipients_per_day", where),
                   None if quota is None else parse_size(quota, f"{where}.mailbox_quota"))


def parse_accounts(text: str, source: str = "users file") -> dict[str, Account]:
    """Parse a users file of either format: lower-cased name -> Account."""
    if _old_format(text):
        return _parse_old(text, source)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsersFileError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(document) - {"users"}
    if unknown:
        raise UsersFileError(f"{source}: unknown tables {sorted(unknown)} (expected [users.\"NAME\"] tables)")
    users = document.get("users", {})
    if not isinstance(users, dict):
        raise UsersFileError(f"{source}: 'users' must be a table of accounts")
    accounts: dict[str, Account] = {}
    for name, entry in users.items():
        if name.lower() in accounts:
            raise UsersFileError(f"{source}: users.{json.dumps(name)} is listed twice (names ignore case)")
        accounts[name.lower()] = _account(name, entry, source)
    return accounts


def parse_users(text: str, source: str = "users file") -> dict[str, str]:
    """Lower-cased name -> password hash (the older interface)."""
    return {key: account.password_hash for key, account in parse_accounts(text, source).items()}


def render_accounts(accounts: dict[str, Account]) -> str:
    """The TOML text of a users file (JSON strings are valid TOML basic strings when not ASCII-escaped)."""
    def quote(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    parts = ["# mtacluster users file (auth.users_file): see `mtacluster user --help` and the README.\n"]
    for account in sorted(accounts.values(), key=lambda a: a.name.lower()):
        lines = [f"[users.{quote(account.name)}]", f"password = {quote(account.password_hash)}",
                 f"active = {'true' if account.active else 'false'}",
                 f"addresses = [{', '.join(quote(a) for a in account.addresses)}]"]
        for key in ("messages_per_day", "recipients_per_day", "mailbox_quota"):
            value = getattr(account, key)
            if value is not None:
                lines.append(f"{key} = {value}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


@dataclass
class UserDatabase:
    """The users file, re-read when it changes. An empty path means: no accounts, nobody can log in."""

    path: str
    _accounts: dict[str, Account] = field(default_factory=dict)
    _stamp: tuple[int, int, int] | None = None

    def _refresh(self) -> None:
        if not self.path:
            return
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp != self._stamp:
                self._accounts = parse_accounts(Path(self.path).read_text(), self.path)
                self._stamp = stamp
        except OSError as exc:
            raise UsersFileError(f"{self.path}: cannot read: {exc.strerror}") from None

    def names(self) -> list[str]:
        self._refresh()
        return sorted(account.name for account in self._accounts.values())

    def accounts(self) -> list[Account]:
        self._refresh()
        return sorted(self._accounts.values(), key=lambda a: a.name.lower())

    def get(self, name: str) -> Account | None:
        self._refresh()
        return self._accounts.get(name.lower())

    def authenticate(self, name: str, password: str) -> AuthOutcome:
        """Check a login. Costs one scrypt in every case: no name probing by timing."""
        account = self.get(name)
        if account is None:
            check_password(password, _DUMMY_HASH)
            return AuthOutcome.UNKNOWN_USER
        if not check_password(password, account.password_hash):
            return AuthOutcome.BAD_PASSWORD
        return AuthOutcome.OK if account.active else AuthOutcome.DISABLED

    def verify(self, name: str, password: str) -> bool:
        """True when `name` exists, is active, and `password` is its password."""
        return self.authenticate(name, password) is AuthOutcome.OK

    def receives(self, address: str) -> bool:
        """True when some account (active or not: its mail is still its mail) takes mail for `address`."""
        self._refresh()
        local = address.rpartition("@")[0].lower()
        return any(account.receives(address) or account.name.lower() == local
                   for account in self._accounts.values())


_DUMMY_HASH = hash_password("not a real password", salt=b"\0" * 16)


def _load_for_change(path: str) -> dict[str, Account]:
    text = Path(path).read_text() if os.path.exists(path) else ""
    return parse_accounts(text, path)


def add_user(path: str, name: str, password: str, *, addresses: tuple[str, ...] = (),
             messages_per_day: int | None = None, recipients_per_day: int | None = None) -> None:
    """Add a user, or change an existing user's password (and the given settings; the others are kept)."""
    if not valid_name(name):
        raise UsersFileError(f"{name!r} is not a valid user name (no spaces, ':', '#' or quotes)")
    for address in addresses:
        if not valid_sender_address(address):
            raise UsersFileError(f"{address!r} is not an address (\"a@example.org\") or a domain (\"@example.org\")")
    accounts = _load_for_change(path)
    old = accounts.get(name.lower())
    account = old or Account(name, "")
    account = replace(account, password_hash=hash_password(password),
                      addresses=tuple(dict.fromkeys(account.addresses + addresses)),
                      messages_per_day=account.messages_per_day if messages_per_day is None else messages_per_day,
                      recipients_per_day=(account.recipients_per_day if recipients_per_day is None
                                          else recipients_per_day))
    accounts[name.lower()] = account
    _write(path, render_accounts(accounts))


def set_active(path: str, name: str, active: bool) -> bool:
    """Enable or disable an account; False when there is no such account."""
    accounts = _load_for_change(path)
    account = accounts.get(name.lower())
    if account is None:
        return False
    accounts[name.lower()] = replace(account, active=active)
    _write(path, render_accounts(accounts))
    return True


def remove_user(path: str, name: str) -> bool:
    accounts = _load_for_change(path)
    if accounts.pop(name.lower(), None) is None:
        return False
    _write(path, render_accounts(accounts))
    return True


def _write(path: str, text: str) -> None:
    temporary = f"{path}.tmp.{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
