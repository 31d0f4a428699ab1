"""Every reply the sans-I/O SMTP server (`cluster.smtp.server`) sends on its own, as named `Reply` constants.

One source of truth for reply texts: the server, the frontend glue and the tests all use these names. Replies
whose text depends on the session (greeting, EHLO/HELO, address errors) are built by the small functions at
the end. Every reply carries an RFC 3463 enhanced status code (RFC 2034), except the 220 greeting, the
EHLO/HELO replies and 354, as is conventional.
"""

from __future__ import annotations

from cluster.smtp.reply import Reply

# --- positive replies ---
OK = Reply.of(250, "2.0.0", "OK")
RESET_OK = Reply.of(250, "2.0.0", "Reset OK")
SENDER_OK = Reply.of(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply.of(250, "2.1.5", "Recipient OK")
MESSAGE_ACCEPTED = Reply.of(250, "2.0.0", "Message accepted for delivery")
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

# --- address syntax (used by cluster.smtp.address) ---
UTF8_NEEDS_SMTPUTF8 = Reply.of(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter on MAIL (RFC 6531)")


def greeting(hostname: str) -> Reply:
    """RFC 5321 4.3.1: the 220 service-ready greeting starts with the server's name."""
    return Reply.of(220, "", f"{hostname} ESMTP mtacluster")


def _echoed(client_name: str) -> str:
    """The client's EHLO/HELO name as a reply repeats it: printable US-ASCII only (RFC 5321 4.2 textstring), any
    other character as "?", at most 255 of them (4.5.3.1.2), so the reply line stays within 512 octets."""
    return "".join(c if " " <= c <= "~" else "?" for c in client_name[:255])


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
