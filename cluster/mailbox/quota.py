"""Mailbox quotas: how much a Maildir holds, how much it may hold, and whether one more message fits.

Usage is the octets and count of the message files in `new/` and `cur/` (a message still in `tmp/` is not
delivered yet). The quota is `mailbox.quota` (0 = none), unless the users file gives the user a
`mailbox_quota` of its own (`quota_override`: the one place that reads that field). `verdict()` decides a
delivery as RFC 2033 / RFC 3463 X.2.2 want it: fits; over quota now (452 4.2.2, the user may delete mail);
never fits (the message alone is larger than the quota: 552 5.2.2).

`mailbox_usage(config, name)` is what `mtacluster user show` prints: it reads the Maildir under this
machine's `mailbox.maildir_root` (on a cluster with several nodes, the owner's; see `ownership`).
Failure modes: a missing Maildir is empty; files vanishing during the scan (a POP3 QUIT) are skipped; an
unreadable users file means no override (the global quota applies) and is logged by the caller.
"""

from __future__ import annotations

import enum
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cluster.config import Config, ConfigError, parse_size
from cluster.mailbox.maildir import MailboxNameError, mailbox_name
from cluster.mailbox.ownership import login_localpart
from cluster.users import UserDatabase, UsersFileError


class Verdict(enum.Enum):
    FITS = "fits"
    OVER_QUOTA = "over_quota"  # 452 4.2.2
    NEVER_FITS = "never_fits"  # 552 5.2.2


@dataclass(frozen=True)
class MailboxUsage:
    messages: int
    octets: int
    quota: int  # 0 = no limit


def maildir_usage(directory: Path) -> tuple[int, int]:
    """(messages, octets) of the Maildir at `directory` (new/ and cur/). Blocking: call it in a thread."""
    messages = octets = 0
    for sub in ("new", "cur"):
        try:
            entries = list(os.scandir(directory / sub))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                octets += entry.stat().st_size
            except FileNotFoundError:
                continue
            messages += 1
    return messages, octets


def quota_override(users: UserDatabase, mailbox: str) -> int | None:
    """The users file's `mailbox_quota` for the account whose Maildir is `mailbox`, or None (no override).

    The one place that reads that per-user field. The users file is TOML, one table per account
    (`[users."alice@example.org"]` with `mailbox_quota = "1GiB"`); a file in the older one-line-per-user
    format has no quotas. Accounts whose names share a local part share a Maildir: the first of them (by name)
    with a quota sets it. Raises UsersFileError for a quota that is not a size.
    """
    if not users.path:
        return None
    try:
        document = tomllib.loads(Path(users.path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # unreadable (the logins fail and say why) or the line format: no per-user quotas
    accounts = document.get("users")
    if not isinstance(accounts, dict):
        return None
    for name, entry in sorted(accounts.items()):
        if not isinstance(entry, dict) or "mailbox_quota" not in entry:
            continue
        try:
            if mailbox_name(login_localpart(name)) != mailbox:
                continue
            return int(parse_size(entry["mailbox_quota"], f"users.{name}.mailbox_quota"))
        except MailboxNameError:
            continue
        except ConfigError as exc:
            raise UsersFileError(f"{users.path}: {exc}") from None
    return None


def effective_quota(default: int, users: UserDatabase, mailbox: str) -> int:
    override = quota_override(users, mailbox)
    return default if override is None else override


def verdict(quota: int, used: int, size: int) -> Verdict:
    if quota <= 0:
        return Verdict.FITS
    if size > quota:
        return Verdict.NEVER_FITS
    if used + size > quota:
        return Verdict.OVER_QUOTA
    return Verdict.FITS


def mailbox_usage(config: Config, name: str, users: UserDatabase | None = None) -> MailboxUsage:
    """Messages, octets and quota of the Maildir of user `name` ("alice@example.org" or "alice")."""
    mailbox = mailbox_name(login_localpart(name))
    messages, octets = maildir_usage(Path(config.mailbox.maildir_root) / mailbox)
    quota = effective_quota(int(config.mailbox.quota), users or UserDatabase(config.auth.users_file), mailbox)
    return MailboxUsage(messages, octets, quota)
