"""The delivery worker: takes jobs from the queue shards, routes them, and delivers them by SMTP or to Maildir."""
