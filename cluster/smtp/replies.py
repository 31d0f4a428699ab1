"""SMTP replies: the `Reply` value type, and every reply text this project sends, as named constants.

One source of truth for reply texts (the SMTP server machine, the frontend glue, the delivery side and the
tests all use these names; nothing else builds a reply from literal text). A `Reply` is a three-digit code, an
optional RFC 3463 enhanced status code and text lines, kept apart (never flattened to a string and parsed
back): the server formats its replies with `Reply.to_bytes()`, the client builds `Reply` values from what a
remote server sent (`Reply.from_lines`).

Replies whose text depends on the session (greeting, EHLO/HELO, address errors, queue ids) are built by small
functions next to their constants. Every reply carries an enhanced status code (RFC 2034), except the 220
greeting, the EHLO/HELO replies, 334 and 354, as is conventional.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str = ""
    lines: tuple[str, ...] = ("",)

    @classmethod
    def of(cls, code: int, enhanced: str, *lines: str) -> Reply:
        return cls(code, enhanced, lines or ("",))

    @property
    def text(self) -> str:
        """All lines joined with a space: the server's words, for logs and DSN Diagnostic-Code (made once per
        Reply and kept on the instance: a parsed reply is shared by every delivery it answers)."""
        text: str | None = self.__dict__.get("_text")
        if text is None:
            text = " ".join(line for line in self.lines if line)
            object.__setattr__(self, "_text", text)  # not a field: equality and hashing ignore it
        return text

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def to_bytes(self) -> bytes:
        """RFC 5321 4.2.1: "code-text" for every line but the last, "code text" for the last.

        Made once per Reply (the constants below are sent many times a second) and kept on the instance."""
        wire: bytes | None = self.__dict__.get("_wire")
        if wire is None:
            prefix = f"{self.enhanced} " if self.enhanced else ""
            out = []
            for index, line in enumerate(self.lines):
                sep = " " if index == len(self.lines) - 1 else "-"
                out.append(f"{self.code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
            wire = "".join(out).encode("utf-8")
            object.__setattr__(self, "_wire", wire)  # not a field: equality and hashing ignore it
        return wire

    @classmethod
    def from_lines(cls, code: int, lines: list[str]) -> Reply:
        """Build from the text parts of a received reply, splitting off the enhanced code (RFC 2034)."""
        enhanced = ""
        texts = []
        for line in lines or [""]:
            m = _ENHANCED.match(line)
            if m and m.group(1) == str(code)[0]:
                enhanced = enhanced or f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
                line = line[m.end():]
            texts.append(line)
        return cls(code, enhanced, tuple(texts))

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}".rstrip()


# --- positive replies ---
OK = Reply.of(250, "2.0.0", "OK")
RESET_OK = Reply.of(250, "2.0.0", "Reset OK")
SENDER_OK = Reply.of(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply.of(250, "2.1.5", "Recipient ok")
# RFC 5321 4.2.1: 354 has no enhanced code (RFC 2034 covers only 2xx/4xx/5xx).
START_DATA = Reply.of(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply.of(221, "2.0.0", "Bye")
HELP = Reply.of(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY",
    "See RFC 5321",
)
# RFC 5321 3.5.3: 252 when the server will not verify but will accept mail for the user.
CANNOT_VRFY = Reply.of(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

# --- command syntax and sequence (RFC 5321 4.2.4, 4.3.2) ---
UNKNOWN_COMMAND = Reply.of(500, "5.5.2", "Command not recognized")
# RFC 5321 2.3.8: only CRLF ends a line; a bare CR or LF, or a NUL, makes the whole line invalid.
BARE_LINE_ENDING_IN_COMMAND = Reply.of(
    500, "5.5.2", "Bare CR or LF, or NUL, in command line; only CRLF ends a line (RFC 5321 2.3.8)"
)
COMMAND_NOT_UTF8 = Reply.of(500, "5.5.2", "Command line is not valid UTF-8")
COMMAND_TOO_LONG = Reply.of(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.4)")
EXPN_NOT_AVAILABLE = Reply.of(502, "5.5.1", "EXPN not available")
NEED_HELO = Reply.of(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL_BEFORE_RCPT = Reply.of(503, "5.5.1", "Need MAIL before RCPT")
NEED_MAIL_BEFORE_DATA = Reply.of(503, "5.5.1", "Need MAIL before DATA")
NESTED_MAIL = Reply.of(503, "5.5.1", "Sender already specified; send RSET to start over")
# RFC 5321 3.3: DATA after MAIL but with no accepted recipient.
NO_VALID_RECIPIENTS = Reply.of(554, "5.5.1", "No valid recipients")
HELO_SYNTAX = Reply.of(501, "5.5.4", "Syntax: EHLO <domain> or HELO <domain>")
MAIL_SYNTAX = Reply.of(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply.of(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
NO_ARGUMENTS_ALLOWED = Reply.of(501, "5.5.4", "Syntax error: this command takes no arguments")
VRFY_SYNTAX = Reply.of(501, "5.5.4", "Syntax: VRFY <address>")

# --- CHUNKING (RFC 3030) ---
BDAT_SYNTAX = Reply.of(501, "5.5.4", "Syntax: BDAT <chunk-size> [LAST]")
DATA_AFTER_BDAT = Reply.of(503, "5.5.1", "DATA not allowed after BDAT in the same transaction")


def chunk_received(octets: int) -> Reply:
    return Reply.of(250, "2.0.0", f"{octets} octets received")


# --- parameters (RFC 5321 4.1.2 esmtp-param; RFC 1870 SIZE; RFC 6152 BODY; RFC 6531 SMTPUTF8) ---
PARAMETER_SYNTAX = Reply.of(501, "5.5.4", "Syntax error in parameters")
DUPLICATE_PARAMETER = Reply.of(501, "5.5.4", "Parameter given twice")
SIZE_SYNTAX = Reply.of(501, "5.5.4", "SIZE must be a decimal number of octets")
BODY_SYNTAX = Reply.of(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
SMTPUTF8_SYNTAX = Reply.of(501, "5.5.4", "SMTPUTF8 takes no value")
UNKNOWN_MAIL_PARAMETER = Reply.of(555, "5.5.4", "MAIL parameter not recognized or not implemented")
UNKNOWN_RCPT_PARAMETER = Reply.of(555, "5.5.4", "RCPT parameter not recognized or not implemented")
MESSAGE_SIZE_EXCEEDS_LIMIT = Reply.of(552, "5.3.4", "Declared SIZE exceeds fixed maximum message size")

# --- transaction limits (RFC 5321 4.5.3.1.10) ---
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3", "Too many recipients")

# --- end of DATA refusals, decided by the state machine before the glue sees the message ---
MESSAGE_TOO_BIG = Reply.of(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING_IN_DATA = Reply.of(
    550, "5.6.0", "Message refused: bare CR or LF, or NUL, in message data; only CRLF ends a line (RFC 5321 2.3.8)"
)
TEXT_LINE_TOO_LONG = Reply.of(550, "5.6.0", "Message refused: text line longer than the limit (RFC 5321 4.5.3.1.6)")

# --- session end ---
TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply.of(421, "4.4.2", "Timeout waiting for client, closing connection")

# --- LMTP (RFC 2033), used by cluster.smtp.lmtp and the mailbox role's glue ---
# RFC 2033 4.2: DATA with no accepted recipient "MUST fail with a 503 reply code".
LMTP_NO_VALID_RECIPIENTS = Reply.of(503, "5.5.1", "No valid recipients")
# RFC 3463 X.2.2: mailbox full. 452 while the mailbox is over its quota now (or the disk is full): try later.
MAILBOX_OVER_QUOTA = Reply.of(452, "4.2.2", "Mailbox over quota, try again later")
MAILBOX_DISK_FULL = Reply.of(452, "4.2.2", "Mailbox storage full, try again later")
# 552 when the message is larger than the whole quota: it can never fit.
MESSAGE_EXCEEDS_QUOTA = Reply.of(552, "5.2.2", "Message larger than the mailbox quota")
MAILBOX_WRITE_FAILED = Reply.of(451, "4.3.0", "Mailbox write failed, try again later")
# RFC 3463 X.1.3: the local part cannot name a mailbox.
BAD_MAILBOX_NAME = Reply.of(550, "5.1.3", "Local part cannot name a mailbox")
# ARCHITECTURE.md contract 7: a node takes only the mailboxes it owns; another node's are a configuration
# mismatch between worker and mailbox node (X.3.5: system incorrectly configured), retried later.
NOT_MAILBOX_OWNER = Reply.of(451, "4.3.5", "This mailbox node does not own that mailbox (mailbox.nodes differ?)")


def lmtp_greeting(hostname: str) -> Reply:
    return Reply.of(220, "", f"{hostname} LMTP mtacluster")


def lmtp_delivered(file_name: str) -> Reply:
    """250 once the message file and its directory are fsynced; the file name links the shard's log line
    (which carries the queue id and this reply) to the Maildir file."""
    return Reply.of(250, "2.0.0", f"Delivered to the mailbox as {file_name}")


# --- address syntax (used by cluster.smtp.address) ---
UTF8_NEEDS_SMTPUTF8 = Reply.of(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter on MAIL (RFC 6531)")


@functools.lru_cache(maxsize=16)
def greeting(hostname: str) -> Reply:
    """RFC 5321 4.3.1: the 220 service-ready greeting starts with the server's name."""
    return Reply.of(220, "", f"{hostname} ESMTP mtacluster")


def _echoed(client_name: str) -> str:
    """The client's EHLO/HELO name as a reply repeats it: printable US-ASCII only (RFC 5321 4.2 textstring), any
    other character as "?", at most 255 of them (4.5.3.1.2), so the reply line stays within 512 octets."""
    name = client_name[:255]
    if name.isascii() and name.isprintable():  # the usual case: printable ASCII is " " to "~"
        return name
    return "".join(c if " " <= c <= "~" else "?" for c in name)


def helo_reply(hostname: str, client_name: str) -> Reply:
    return Reply.of(250, "", f"{hostname} Hello {_echoed(client_name)}")


def ehlo_reply(hostname: str, client_name: str, extensions: tuple[str, ...]) -> Reply:
    """RFC 5321 4.1.1.1: first line is the greeting, each further line one extension keyword."""
    return Reply(250, "", (f"{hostname} Hello {_echoed(client_name)}", *extensions))


def bad_sender(text: str) -> Reply:
    """RFC 3463 X.1.7: bad sender mailbox address syntax."""
    return Reply.of(501, "5.1.7", f"Bad sender address syntax: {text}")


def bad_recipient(text: str) -> Reply:
    """RFC 3463 X.1.3: bad destination mailbox address syntax."""
    return Reply.of(501, "5.1.3", f"Bad recipient address syntax: {text}")


def queued_as(queue_ids: list[str]) -> Reply:
    """RFC 5321 4.1.1.4 / DESIGN contract 1: the 250 to end of DATA, sent only once every shard stored its part."""
    return Reply.of(250, "2.0.0", f"Ok: queued as {' '.join(queue_ids)}")


# --- the frontend: connections, storage, relay (cluster.frontend) ---
TOO_MANY_CONNECTIONS = Reply.of(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply.of(421, "4.7.0", "Too many connections from your address, try again later")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Service shutting down, try again later")
# ARCHITECTURE.md contract 1: any failure or timeout before every shard answered Stored.
QUEUE_UNAVAILABLE = Reply.of(451, "4.3.0", "Temporary queue failure, please try again later")
# ARCHITECTURE.md contract 5: no open relay.
RELAY_DENIED = Reply.of(554, "5.7.1", "Relay access denied: this server does not relay for you")
# RFC 6409 4.3 / RFC 4954 6: the submission service takes mail only from authenticated users.
AUTH_REQUIRED = Reply.of(530, "5.7.0", "Authentication required")

# --- STARTTLS (RFC 3207 4) ---
READY_FOR_TLS = Reply.of(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY_ACTIVE = Reply.of(503, "5.5.1", "TLS already active")
STARTTLS_SYNTAX = Reply.of(501, "5.5.4", "Syntax: STARTTLS (no parameters)")

# --- AUTH (RFC 4954 4 and 6; used by cluster.frontend.auth) ---
AUTH_SUCCEEDED = Reply.of(235, "2.7.0", "Authentication successful")
AUTH_INVALID_CREDENTIALS = Reply.of(535, "5.7.8", "Authentication credentials invalid")
AUTH_ENCRYPTION_REQUIRED = Reply.of(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_ALREADY_AUTHENTICATED = Reply.of(503, "5.5.1", "Already authenticated")
AUTH_NOT_IN_TRANSACTION = Reply.of(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_NEED_EHLO = Reply.of(503, "5.5.1", "Send EHLO first")
AUTH_UNKNOWN_MECHANISM = Reply.of(504, "5.5.4", "Unrecognized authentication type (use PLAIN or LOGIN)")
AUTH_SYNTAX = Reply.of(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_CANNOT_DECODE = Reply.of(501, "5.5.2", "Cannot decode response")
AUTH_CANCELLED = Reply.of(501, "5.7.0", "Authentication cancelled")
AUTH_LINE_TOO_LONG = Reply.of(500, "5.5.6", "Authentication exchange line is too long")
AUTH_TEMPORARY_FAILURE = Reply.of(454, "4.7.0", "Temporary authentication failure")
AUTH_TOO_MANY_FAILURES = Reply.of(421, "4.7.0", "Too many failed authentication attempts, closing connection")


def auth_challenge(text: str) -> Reply:
    """RFC 4954 4: "334" SP [base64], without an enhanced status code."""
    return Reply.of(334, "", text)


# --- the delivery side's own words (cluster.delivery): what a worker reports when no remote server answered
# the question, or the answer cannot be used. Always 4xx unless the message itself can never be sent. ---
NO_HOST_TRIED = Reply.of(451, "4.4.0", "No host could be tried")


def delivery_trouble(text: str, enhanced: str = "4.4.2") -> Reply:
    """A network or TLS failure talking to a remote host (RFC 3463 4.4.2 connection dropped, 4.7.5 TLS...)."""
    return Reply.of(451, enhanced, text)


def remote_protocol_error(text: str) -> Reply:
    """The remote server broke the protocol (RFC 3463 4.5.0)."""
    return Reply.of(451, "4.5.0", text)


def starttls_required(remote: str) -> Reply:
    """delivery.tls = "verify" and the remote host offers no STARTTLS (RFC 3463 4.7.10)."""
    return Reply.of(451, "4.7.10", f"{remote} does not offer STARTTLS, and delivery.tls requires it")


def too_big_for_remote(size: int, limit: int, remote: str) -> Reply:
    """RFC 1870 6.1: the remote host's SIZE is smaller than the message; it is not sent (552 5.3.4)."""
    return Reply.of(552, "5.3.4", f"Message size {size} exceeds the limit of {limit} bytes of {remote}")


def smtputf8_unsupported(remote: str) -> Reply:
    """RFC 6531 3.6.1: a non-ASCII address to a host without SMTPUTF8 (553 5.6.7)."""
    return Reply.of(553, "5.6.7", f"{remote} does not support SMTPUTF8, needed for this address")
# --- account and policy refusals decided by the frontend (cluster.accounts) ---
# Password guessing: too many failed AUTH from one client address, cluster-wide (auth.max_failures_per_client).
AUTH_BLOCKED = Reply.of(421, "4.7.0", "Too many failed authentication attempts from your address, try again later")
AUTH_CHECK_UNAVAILABLE = Reply.of(454, "4.7.0", "Temporary authentication failure, try again later")
# The user's queue shard (which keeps its daily counters) cannot be reached: never "allow" (issue 9).
LIMITS_UNAVAILABLE = Reply.of(451, "4.3.0", "Cannot check the sending limit now, try again later")
SENDER_DOMAIN_TEMPFAIL = Reply.of(450, "4.1.8", "Sender address rejected: temporary DNS failure looking up its domain")
RECIPIENT_CHECK_UNAVAILABLE = Reply.of(451, "4.3.0", "Cannot check the recipient now, try again later")
SPF_TEMPERROR = Reply.of(451, "4.7.24", "SPF check of the sender failed temporarily (RFC 7208 temperror), try again")


def sender_not_owned(user: str) -> Reply:
    """auth.sender_login_match: an authenticated MAIL FROM that is not one of the user's addresses."""
    return Reply.of(553, "5.7.1", f"Sender address rejected: not owned by user {user}")


def daily_limit_reached(what: str) -> Reply:
    """A per-user daily limit ([limits]): `what` says which, e.g. "1000 messages per 24 hours"."""
    return Reply.of(450, "4.7.1", f"daily sending limit reached ({what})")


def unknown_recipient(address: str) -> Reply:
    """A local-transport recipient that is neither a user nor an alias."""
    return Reply.of(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown")


def unknown_sender_domain(domain: str) -> Reply:
    """smtp.reject_unknown_sender_domain: no A, AAAA or MX for the MAIL FROM domain (RFC 3463 X.1.8)."""
    return Reply.of(550, "5.1.8", f"Sender address rejected: Domain {domain} not found")


def null_mx_sender_domain(domain: str) -> Reply:
    """RFC 7505 4.2: mail from a domain that publishes a null MX may be refused with 550 5.7.27."""
    return Reply.of(550, "5.7.27", f"Sender address rejected: Domain {domain} does not accept mail (null MX)")


def spf_fail(explanation: str) -> Reply:
    """RFC 7208 8.4 and RFC 7372 3.2: SPF fail under smtp.spf = "reject"."""
    return Reply.of(550, "5.7.23", f"SPF check failed: {explanation}")
