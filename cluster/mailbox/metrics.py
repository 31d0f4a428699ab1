"""Prometheus metrics of the POP3 role (names: mtacluster_pop3_*), defined next to the code they measure."""

from prometheus_client import Counter, Gauge

CONNECTIONS_CURRENT = Gauge("mtacluster_pop3_connections_current", "POP3 connections open now.")
LOGINS = Counter("mtacluster_pop3_logins", "POP3 logins, by result: ok, failed (wrong name or password), "
                 "in_use (maildrop locked by another session), error (users file or maildrop unreadable).",
                 ["result"])
MESSAGES_RETRIEVED = Counter("mtacluster_pop3_messages_retrieved", "Messages sent in full with RETR.")
MESSAGES_DELETED = Counter("mtacluster_pop3_messages_deleted", "Messages removed from a Maildir at QUIT.")

LOGIN_RESULTS = ("ok", "failed", "in_use", "error")
