"""Mailbox quotas: how much a Maildir holds, how much it may hold, and whether one more message fits.

Usage is the octets and count of the message files in `new/` and `cur/` (a message still in `tmp/` is not
delivered yet). The quota is `mailbox.quota` (0 = none), unless the users file gives the user a
`mailbox_quota` of its own (parsed by `cluster.users`; `quota_override` picks the account). `verdict()` decides a
delivery as RFC 2033 / RFC 3463 X.2.2 want it: fits; over quota now (452 4.2.2, the user may delete mail);
never fits (the message alone is larger than the quota: 552 5.2.2).

`mailbox_usage(config, name)` is what `mtacluster user show` prints: it reads the Maildir under this
machine's `mailbox.maildir_root` (on a cluster with several nodes, the owner's; see `ownership`).
Failure modes: a missing Maildir is empty; files vanishing during the scan (a POP3 QUIT) are skipped; an
unreadable users file raises UsersFileError; the caller logs it and applies the global quota.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from cluster.config import Config
from cluster.mailbox.maildir import MailboxNameError, mailbox_name
from cluster.mailbox.ownership import login_localpart
from cluster.users import UserDatabase


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

    The users file (`cluster.users`) parses and checks the field; this picks the account. Accounts whose names
    share a local part share a Maildir: the first of them (by name) with a quota sets it. Raises
    UsersFileError when the users file cannot be read or holds a quota that is not a size.
    """
    for account in users.accounts():
        if account.mailbox_quota is None:
            continue
        try:
            if mailbox_name(login_localpart(account.name)) == mailbox:
                return account.mailbox_quota
        except MailboxNameError:
            continue
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
