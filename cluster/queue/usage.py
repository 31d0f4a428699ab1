"""Per-user sending counters of one shard: the users whose name this shard owns on the ring (ARCHITECTURE.md
contract 7), over a rolling 24 hours. Pure: time is passed in; the shard persists entries in its spool.

`UsageLedger` keeps one entry per counted message (entry id, user, time, 1 message, its recipient count).
- `fits(user, messages, recipients, max_messages, max_recipients, now)`: None when that much more stays within
  the limits (0 = no limit), else the reason ("messages" or "recipients");
- `add(entry)` counts an entry at once (before its commit finishes, so that racing reservations see each other:
  the limit is exact however many frontends ask at the same time); `remove(entry_id)` takes it back (a failed
  commit, or a Release from the frontend when the message was not stored after all);
- `usage(user, now)`: (messages, recipients) within the window; `expired(now)`: entries older than the window,
  which the shard deletes from its spool; `entries()`: every entry, oldest first per user (what a draining
  shard hands to the new owners, cluster.queue.handover).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW = 24 * 3600.0


@dataclass(frozen=True)
class UsageEntry:
    entry_id: str
    user: str
    at: float
    messages: int
    recipients: int


class UsageLedger:
    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._by_user: dict[str, deque[UsageEntry]] = {}
        self._by_id: dict[str, UsageEntry] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._by_id

    def add(self, entry: UsageEntry) -> None:
        if entry.entry_id in self._by_id:
            return
        self._by_id[entry.entry_id] = entry
        entries = self._by_user.setdefault(entry.user.lower(), deque())
        entries.append(entry)
        if len(entries) > 1 and entries[-2].at > entry.at:  # loaded out of order: keep the deque sorted by time
            self._by_user[entry.user.lower()] = deque(sorted(entries, key=lambda e: e.at))

    def remove(self, entry_id: str) -> UsageEntry | None:
        entry = self._by_id.pop(entry_id, None)
        if entry is not None:
            entries = self._by_user.get(entry.user.lower())
            if entries is not None:
                entries.remove(entry)
                if not entries:
                    del self._by_user[entry.user.lower()]
        return entry

    def usage(self, user: str, now: float) -> tuple[int, int]:
        since = now - self.window
        messages = recipients = 0
        for entry in self._by_user.get(user.lower(), ()):
            if entry.at > since:
                messages += entry.messages
                recipients += entry.recipients
        return messages, recipients

    def fits(self, user: str, messages: int, recipients: int, max_messages: int, max_recipients: int,
             now: float) -> str | None:
        used_messages, used_recipients = self.usage(user, now)
        if max_messages and used_messages + messages > max_messages:
            return "messages"
        if max_recipients and used_recipients + recipients > max_recipients:
            return "recipients"
        return None

    def entries(self) -> list[UsageEntry]:
        return [entry for entries in self._by_user.values() for entry in entries]

    def expired(self, now: float) -> list[str]:
        """Ids of the entries that left the window (oldest first); they stay counted until `remove`d."""
        since = now - self.window
        return [entry.entry_id for entries in self._by_user.values() for entry in entries if entry.at <= since]
