"""Delivery status notifications (RFC 3464) built with the stdlib `email` package; pure, no I/O.

`build_dsn(...)` returns the bytes (CRLF line ends) of a `multipart/report; report-type=delivery-status`
message (RFC 6522) for one original message and some of its recipients:
    1. text/plain: what happened, for a human;
    2. message/delivery-status: per-message fields (Reporting-MTA, Arrival-Date) and, per recipient,
       Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date (RFC 3464 2.2, 2.3);
    3. text/rfc822-headers: the original message's header section (RFC 6522 / RFC 3462).
The DSN's envelope sender is the null path and it goes to the original sender; the caller never makes one
for a message whose own sender is null (RFC 3464 sec. 4 / RFC 5321 6.1: never bounce a bounce).
"""

from __future__ import annotations

import email.policy
import email.utils
import re
from dataclasses import dataclass
from email.message import Message as EmailMessage
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from cluster.queue.records import LastOutcome

_REMOTE_HOST = re.compile(r"^(?P<host>[^\[\s]+)")
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class RecipientReport:
    address: str
    action: str  # "failed" or "delayed"
    last: LastOutcome | None  # what last happened to it (typed: kind, code, enhanced, text, remote); None if nothing
    last_attempt: float  # 0 when never tried

    @property
    def remote(self) -> str:
        return self.last.remote if self.last is not None else ""

    @property
    def reply(self) -> str:
        return self.last.reply if self.last is not None else ""


def status_of(report: RecipientReport) -> str:
    """RFC 3464 2.3.4 Status: the enhanced status of the last outcome, or a generic one for its reply class."""
    last = report.last
    if last is not None and last.enhanced:
        return last.enhanced
    if last is not None and last.code // 100 in (2, 4, 5):
        return f"{last.code // 100}.0.0"
    return "5.0.0" if report.action == "failed" else "4.0.0"


def _text(text: str, subtype: str) -> MIMEText:
    """A text part readable as it is (7bit) when it is ASCII, else UTF-8."""
    return MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")


def _date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def _xtext(text: str) -> str:
    """RFC 6533 3 utf-8-addr-xtext: each non-ASCII character as \\x{HEX}, so the field stays ASCII."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def _address_field(address: str) -> str:
    """RFC 3464 2.3.2 Final-Recipient: "rfc822; addr", or RFC 6533 "utf-8; addr" when it is not ASCII."""
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {_xtext(address)}"


def _fields(pairs: list[tuple[str, str]]) -> EmailMessage:
    block = EmailMessage()
    for name, value in pairs:
        block[name] = _xtext(value.replace("\r", " ").replace("\n", " "))
    return block


def build_dsn(*, reporting_mta: str, queue_id: str, original_sender: str, arrival: float,
              reports: list[RecipientReport], original_headers: bytes, now: float,
              will_retry_until: float = 0.0) -> bytes:
    """The DSN message; `reports` all have the same action ("failed" or "delayed")."""
    if not reports:
        raise ValueError("a DSN needs at least one recipient")
    delayed = all(r.action == "delayed" for r in reports)
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{original_sender}>"
    report["Subject"] = ("Delayed Mail (still being retried)" if delayed
                         else "Undelivered Mail Returned to Sender")
    report["Date"] = _date(now)
    report["Message-ID"] = email.utils.make_msgid(f"dsn.{queue_id}", domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 5.1: no automatic replies to this

    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if delayed:
        lines += ["Your message could not be delivered yet to the recipients below. The mail system will keep",
                  "trying; you do not need to send it again."]
    else:
        lines += ["Your message could not be delivered to one or more recipients. It is attached below.",
                  "The reason each recipient failed is given next to it."]
    lines.append("")
    for r in reports:
        where = f" (remote host {r.remote})" if r.remote else ""
        lines.append(f"<{r.address}>{where}: {r.reply or 'no reply'}")
    report.attach(_text("\r\n".join(lines) + "\r\n", "plain"))

    per_message = [("Reporting-MTA", f"dns; {reporting_mta}"), ("X-Queue-ID", queue_id),
                   ("Arrival-Date", _date(arrival))]
    blocks = [_fields(per_message)]
    for r in reports:
        pairs = [("Final-Recipient", _address_field(r.address)), ("Action", r.action), ("Status", status_of(r))]
        host = _REMOTE_HOST.match(r.remote)
        if host:
            pairs.append(("Remote-MTA", f"dns; {host.group('host')}"))
        if r.reply:
            # RFC 3464 2.3.6: "smtp" when the words come from an SMTP server, else our own diagnostic type.
            kind = "smtp" if r.remote else "X-mtacluster"
            pairs.append(("Diagnostic-Code", f"{kind}; {r.reply}"))
        if r.last_attempt:
            pairs.append(("Last-Attempt-Date", _date(r.last_attempt)))
        if delayed and will_retry_until:
            pairs.append(("Will-Retry-Until", _date(will_retry_until)))
        blocks.append(_fields(pairs))
    status = MIMEBase("message", "delivery-status")
    status.set_payload(blocks)  # type: ignore[arg-type]  # the generator writes a list of header blocks
    report.attach(status)

    headers = original_headers[:MAX_HEADER_BYTES].decode("utf-8", "replace").rstrip("\r\n") + "\r\n"
    report.attach(_text(headers, "rfc822-headers"))
    # A non-ASCII sender can only be reached over SMTPUTF8 (RFC 6531), so its header may be UTF-8 too.
    return report.as_bytes(policy=email.policy.SMTP if original_sender.isascii() else email.policy.SMTPUTF8)
