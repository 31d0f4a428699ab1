"""The Received: trace header a frontend prepends to every message (RFC 5321 4.4, RFC 5322 3.6.7).

    Received: from <helo> ([<client ip>])
            by <hostname> (mtacluster) with <protocol> id <trace id>
            for <recipient>; <date>

The protocol name follows RFC 3848 and RFC 6531 (`protocol_name`): SMTP, ESMTP or UTF8SMTP, with "S" after
STARTTLS and "A" after SMTP AUTH (ESMTPS, ESMTPA, ESMTPSA, UTF8SMTPSA...). The authenticated user's name is not
written (Postfix does not either by default): it would tell every recipient who sent from which account.

The "for" clause is added only for a single recipient, so that the names of other (Bcc) recipients never leak.
"""

from __future__ import annotations

import re
import time

_UNSAFE = re.compile(r"[^\x21-\x7e]")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _clean(text: str) -> str:
    """Keep header-safe printable ASCII only: a client's HELO name must not inject header lines."""
    if text.isascii() and text.isprintable() and " " not in text:  # the usual case: nothing to replace
        return text[:255]
    return _UNSAFE.sub("?", text)[:255]


def protocol_name(*, esmtp: bool, smtputf8: bool, tls: bool, authenticated: bool) -> str:
    if not esmtp:
        return "SMTP"  # RFC 3848 defines the S and A suffixes for ESMTP only
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(*, helo: str | None, client_ip: str, hostname: str, protocol: str, trace_id: str,
                    recipients: list[str], timestamp: float) -> bytes:
    helo_part = _clean(helo) if helo else "unknown"
    lines = [f"Received: from {helo_part} ([{_clean(client_ip)}])",
             f"\tby {hostname} (mtacluster) with {protocol} id {trace_id}"]
    date = rfc5322_date(timestamp)
    if len(recipients) == 1:
        lines.append(f"\tfor <{_clean(recipients[0])}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


_last_date: tuple[int, str] = (-1, "")


def rfc5322_date(timestamp: float) -> str:
    """RFC 5322 3.3 date-time in UTC, e.g. "Sun, 29 Nov 2026 22:26:59 +0000" ("+0000" is UTC; "-0000" would
    mean "time zone unknown"). English names whatever the process locale, as email.utils.format_datetime
    writes them, for a fraction of its cost (this runs once per message; the text of the last second is kept)."""
    global _last_date
    second = int(timestamp)
    if second == _last_date[0]:
        return _last_date[1]
    t = time.gmtime(second)
    text = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")
    _last_date = (second, text)
    return text
