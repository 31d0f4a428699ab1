"""Local mailboxes: Maildir delivery and the POP3 server."""
