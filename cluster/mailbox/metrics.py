"""Prometheus metrics of the mailbox role (names: mtacluster_lmtp_*, mtacluster_mailbox_*, mtacluster_pop3_*),
defined next to the code they measure."""

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS_CURRENT = Gauge("mtacluster_pop3_connections_current", "POP3 connections open now.")
LOGINS = Counter("mtacluster_pop3_logins", "POP3 logins, by result: ok, failed (wrong name or password), "
                 "in_use (maildrop locked by another session), error (users file or maildrop unreadable), "
                 "proxy_error (the owning mailbox node could not be reached).",
                 ["result"])
MESSAGES_RETRIEVED = Counter("mtacluster_pop3_messages_retrieved", "Messages sent in full with RETR.")
MESSAGES_DELETED = Counter("mtacluster_pop3_messages_deleted", "Messages removed from a Maildir at QUIT.")
SESSIONS = Counter("mtacluster_pop3_sessions", "POP3 sessions by listener (pop3: STLS port, pop3s: implicit TLS) "
                   "and how the mailbox was served after login (local, proxied to its owner, none: no login).",
                   ["listener", "served"])

LMTP_DELIVERIES = Counter("mtacluster_lmtp_deliveries", "Recipients of LMTP transactions by outcome: delivered "
                          "(fsynced), over_quota (452 4.2.2), too_big (552 5.2.2), disk_full (452 4.2.2), "
                          "error (451 4.3.0), refused (bad mailbox name or not this node's mailbox).",
                          ["outcome"])
LMTP_CONNECTIONS_CURRENT = Gauge("mtacluster_lmtp_connections_current", "LMTP connections open now.")
MAILBOX_SIZE = Histogram("mtacluster_mailbox_size_bytes", "Size of the Maildir a message was just delivered to.",
                         buckets=(2**20, 10 * 2**20, 100 * 2**20, 500 * 2**20, 2**30, 5 * 2**30, 10 * 2**30))
QUOTA_USAGE = Histogram("mtacluster_mailbox_quota_usage_ratio", "Used share of the quota of the Maildir a "
                        "message was just delivered to (mailboxes with a quota only).",
                        buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0))

LOGIN_RESULTS = ("ok", "failed", "in_use", "error", "proxy_error")
LMTP_OUTCOMES = ("delivered", "over_quota", "too_big", "disk_full", "error", "refused")
