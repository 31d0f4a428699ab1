"""The suppression list of one shard: recipients that hard-bounced, and the bounce classifier that decides it.

`classify(code, enhanced, text)` puts a failure reply in a bounce category (the categories of KumoMTA's bounce
classifier, decided here from the RFC 3463 enhanced status code, then from common wordings): InvalidRecipient
(5.1.1, 5.1.0, 5.1.3, 5.1.6 "no such user"), BadDomain (5.1.2, 5.1.10, 5.4.4), InactiveMailbox (5.2.1
"disabled"), QuotaIssues (x.2.2), MessageExpired (x.4.7), PolicyRelated / SpamBlock / AuthenticationFailed
(x.7.x), ContentRelated (x.6.x), RoutingErrors (x.4.x), ProtocolErrors (x.5.x), Uncategorized otherwise.
Only the first three say the address itself is bad (`SUPPRESSING`): those are suppressed, never a policy,
spam or quota refusal, which says something about the sender or the moment.

`SuppressionList` keeps address -> entry (category, the reply, since, until) in memory and in its own SQLite
file next to the shard's spool (committed before `add` returns, like the spool). Entries last
`suppression.ttl`; expired ones are ignored and dropped. The list lives on the shard that owns the address's
domain (ARCHITECTURE.md contract 7), which is where its bounces are decided and its later mail is queued.
Failure modes: a list file that cannot be written raises OSError/sqlite3.Error to the caller, which logs it
(a missed suppression costs one more attempt, never a message).
"""

from __future__ import annotations

import datetime
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cluster.bus.schemas import OutcomeKind
from cluster.queue.records import LastOutcome

SUPPRESSING = frozenset({"InvalidRecipient", "BadDomain", "InactiveMailbox"})

_BY_CODE = {
    "5.1.0": "InvalidRecipient", "5.1.1": "InvalidRecipient", "5.1.3": "InvalidRecipient",
    "5.1.6": "InvalidRecipient", "5.1.2": "BadDomain", "5.1.10": "BadDomain", "5.4.4": "BadDomain",
    "5.2.1": "InactiveMailbox",
}
_BY_TEXT = [
    (re.compile(r"(user|mailbox|recipient|address)\s+(unknown|not found|does not exist|doesn't exist)|"
                r"no such (user|mailbox|recipient)|unknown (user|recipient|mailbox)", re.I), "InvalidRecipient"),
    (re.compile(r"(mailbox|account)\s+(is\s+)?(disabled|inactive|suspended|closed|deactivated)", re.I),
     "InactiveMailbox"),
    (re.compile(r"(quota|mailbox (is )?full|over ?quota|insufficient storage)", re.I), "QuotaIssues"),
    (re.compile(r"(spam|blocked|blacklist|blocklist|reputation|\bRBL\b)", re.I), "SpamBlock"),
]


def classify(code: int, enhanced: str, text: str) -> str:
    if code >= 500 and enhanced in _BY_CODE:
        return _BY_CODE[enhanced]
    for pattern, category in _BY_TEXT:
        if pattern.search(text):
            return category if code >= 500 or category not in SUPPRESSING else "Uncategorized"
    subject = enhanced.split(".")[1] if enhanced.count(".") == 2 else ""
    if enhanced.endswith(".2.2"):
        return "QuotaIssues"
    if enhanced.endswith(".4.7"):
        return "MessageExpired"
    if enhanced in ("5.7.26", "5.7.27", "5.7.25", "5.7.20", "5.7.23"):
        return "AuthenticationFailed"
    return {"7": "PolicyRelated", "6": "ContentRelated", "4": "RoutingErrors",
            "5": "ProtocolErrors"}.get(subject, "Uncategorized")


def suppressed_outcome(entry: Entry) -> LastOutcome:
    """What a suppressed recipient fails with (it goes into the DSN): the original status, and why."""
    enhanced = entry.reply.split(" ")[1] if entry.reply.count(" ") >= 1 else "5.1.1"
    if not re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", enhanced):
        enhanced = "5.1.1"
    since = datetime.datetime.fromtimestamp(entry.since, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return LastOutcome(OutcomeKind.FAILED, 550, enhanced, f"Not attempted: this address is on the suppression "
                       f"list after a hard bounce ({entry.category}) on {since}: {entry.reply}")


@dataclass(frozen=True)
class Entry:
    address: str
    category: str
    reply: str
    since: float
    until: float


class SuppressionList:
    def __init__(self, path: Path | None, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, Entry] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None and ttl > 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS suppression (address TEXT PRIMARY KEY, category TEXT NOT "
                             "NULL, reply TEXT NOT NULL, since REAL NOT NULL, until REAL NOT NULL)")
            for row in self._db.execute("SELECT address, category, reply, since, until FROM suppression"):
                self._entries[row[0]] = Entry(*row)

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def lookup(self, address: str, now: float) -> Entry | None:
        entry = self._entries.get(address.lower())
        if entry is not None and entry.until <= now:
            self.remove(address)
            return None
        return entry

    def add(self, address: str, category: str, reply: str, now: float, ttl: float | None = None) -> Entry:
        entry = Entry(address.lower(), category, reply[:500], now, now + (self.ttl if ttl is None else ttl))
        if self._db is not None:
            self._db.execute("INSERT OR REPLACE INTO suppression VALUES (?, ?, ?, ?, ?)",
                             (entry.address, entry.category, entry.reply, entry.since, entry.until))
        self._entries[entry.address] = entry
        return entry

    def remove(self, address: str) -> bool:
        found = self._entries.pop(address.lower(), None) is not None
        if self._db is not None:
            self._db.execute("DELETE FROM suppression WHERE address = ?", (address.lower(),))
        return found

    def entries(self, now: float) -> list[Entry]:
        return sorted((e for e in list(self._entries.values()) if self.lookup(e.address, now) is not None),
                      key=lambda e: e.since)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
