"""Maildir storage of the mailbox role (the Maildir format as qmail defined it).

`MaildirStore(root).deliver(localpart, sender, body)` writes one message to `<root>/<localpart>/new/`:
the file is written in `tmp/`, fsynced, renamed into `new/` (atomic: a reader never sees half a message),
and the `new/` directory is fsynced so the rename survives a crash. Before the message it writes the
`Return-Path:` line that RFC 5321 4.4 asks the final delivery to add; the message itself is unchanged.
Missing directories (a first message to a mailbox) are created.

Failure modes: a local part that cannot be a directory name ("", ".", "..", "/", NUL, a leading dot) raises
`MailboxNameError` (a permanent failure for that recipient, 5.1.3); an OSError (disk full, permissions) is
passed on for the caller to defer (4.3.0); in that case the temporary file is removed.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path


class MailboxNameError(ValueError):
    """The local part cannot name a mailbox directory."""


_counter = itertools.count(1)


def mailbox_name(localpart: str) -> str:
    """The directory name of a local part: lower-cased; refuses anything that could leave the root."""
    name = localpart.strip().lower()
    if name.startswith('"') and name.endswith('"') and len(name) >= 2:
        name = name[1:-1]  # RFC 5321 4.1.2 quoted-string local part
    if not name or name.startswith(".") or any(ch in name for ch in "/\\\0\r\n"):
        raise MailboxNameError(f"local part {localpart!r} cannot name a mailbox")
    return name


def with_return_path(sender: str, body: bytes) -> bytes:
    """The message as stored: RFC 5321 4.4 Return-Path line first (its size counts against the quota)."""
    return b"Return-Path: <" + sender.encode("utf-8") + b">\r\n" + body


class MaildirStore:
    def __init__(self, root: str | Path, hostname: str | None = None) -> None:
        self.root = Path(root)
        # The unique-name recipe: time, microseconds, pid, a counter, and the host name without "/" or ":".
        self._host = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")

    def mailbox(self, localpart: str) -> Path:
        return self.root / mailbox_name(localpart)

    def deliver(self, localpart: str, sender: str, body: bytes) -> Path:
        """Write one message; return the path of the file in new/. Blocking (call it in a thread)."""
        box = self.mailbox(localpart)
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{self._host}"
        temporary = box / "tmp" / name
        final = box / "new" / name
        content = with_return_path(sender, body)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(content)
                while view:
                    written = os.write(descriptor, view)
                    view = view[written:]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.rename(temporary, final)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(box / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return final
