"""The Received: trace header a frontend prepends to every message (RFC 5321 4.4, RFC 5322 3.6.7).

    Received: from <helo> ([<client ip>])
            by <hostname> (mtacluster) with <ESMTP|SMTP|UTF8SMTP> id <trace id>
            for <recipient>; <date>

The "for" clause is added only for a single recipient, so that the names of other (Bcc) recipients never leak.
"""

from __future__ import annotations

import email.utils
import re

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _clean(text: str) -> str:
    """Keep header-safe printable ASCII only: a client's HELO name must not inject header lines."""
    return _UNSAFE.sub("?", text)[:255]


def received_header(*, helo: str | None, client_ip: str, hostname: str, protocol: str, trace_id: str,
                    recipients: list[str], timestamp: float) -> bytes:
    helo_part = _clean(helo) if helo else "unknown"
    lines = [f"Received: from {helo_part} ([{_clean(client_ip)}])",
             f"\tby {hostname} (mtacluster) with {protocol} id {trace_id}"]
    date = email.utils.formatdate(timestamp, localtime=False)
    if len(recipients) == 1:
        lines.append(f"\tfor <{_clean(recipients[0])}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
