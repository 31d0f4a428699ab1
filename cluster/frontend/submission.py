"""Message submission (RFC 6409): the header fields a submission server adds to what a mail client sent.

Input: the message as received after DATA (CRLF lines, dot-unstuffed), the server's host name, the trace id of
the session's Received header, and the time. Output: the same message with `Message-ID` (RFC 6409 8.3) and
`Date` (RFC 6409 8.2, RFC 5322 3.3, in UTC) added at the end of the header section when it has none; a
message that has both comes back unchanged, byte for byte. Only the submission listeners call this: mail that
arrives on port 25 is never rewritten.

The header section is the run of header fields (RFC 5322 2.2: "name:" lines and their folded continuation
lines) at the start of the message. When the message does not start with one, or the section does not end
with the empty line, the added fields are followed by an empty line so the client's text stays body.
Failure modes: none; bytes that are not header fields are left where they are.
"""

from __future__ import annotations

import datetime
import email.utils
import re

# RFC 5322 3.6.4 / 2.2: field-name = 1*ftext (printable US-ASCII except ":"), then ":".
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def _header_section(data: bytes) -> tuple[int, list[bytes], bool]:
    """(end offset of the header fields, their lower-cased names, whether the empty line follows them)."""
    names: list[bytes] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\r\n", offset)
        line_end = len(data) if end < 0 else end + 2
        line = data[offset:line_end]
        if line == b"\r\n":
            return offset, names, True
        if line[:1] in (b" ", b"\t") and names:
            offset = line_end  # a folded continuation of the previous field
            continue
        field = _FIELD.match(line)
        if field is None:
            return offset, names, False
        names.append(field.group(1).lower())
        offset = line_end
    return offset, names, False


def complete_headers(data: bytes, *, hostname: str, trace_id: str, timestamp: float) -> bytes:
    """Add Message-ID and Date when the message has none (see the module docstring)."""
    end, names, has_separator = _header_section(data)
    added = []
    if b"message-id" not in names:
        added.append(f"Message-ID: <{trace_id}.{int(timestamp)}@{hostname}>\r\n".encode("ascii"))
    if b"date" not in names:
        date = email.utils.format_datetime(datetime.datetime.fromtimestamp(timestamp, datetime.UTC))
        added.append(f"Date: {date}\r\n".encode("ascii"))
    if not added:
        return data
    head = data[:end]
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"  # a message of header fields only, the last without its CRLF
    separator = b"" if has_separator or (end == len(data) and names) else b"\r\n"
    return head + b"".join(added) + separator + data[end:]
