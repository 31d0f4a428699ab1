"""Shared test helpers: one module per job, imported by tests as `tests.support.<module>`.

- `tooling`: `require_tool` (skip on a laptop, fail when CI=true) and `free_port`.
- `harness`: real processes for integration tests (smtp-sink, dnsmasq, mtacluster roles) and `wait_for`.
- `scripted_smtp`: an SMTP peer that answers from a script, for fault cases smtp-sink cannot play.
- `smtp_driver`: feeds bytes to the sans-I/O SMTP server machine and parses its replies.
- `shard`: a queue shard in the test's event loop, and a bus client speaking the schemas to it.
- `scripted_shard`: a ROUTER socket that answers frontend Injects as each test decides.
- `dsn`: reading RFC 3464 delivery-status parts back with the stdlib `email` package.
- `tls_peers`: an HTTPS server for MTA-STS policies and an SMTP server offering STARTTLS (aiosmtpd).
- `promql_names`: metric names the code exports and the names a PromQL expression refers to.

Test modules import helpers from here only, never from each other; fixtures shared by several modules live in
`tests/conftest.py`.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
