"""DKIM relaxed canonicalization and header field selection (RFC 6376 3.4.2, 3.4.4, 5.4.2). Pure: bytes in, bytes out.

Input: a message as the frontend stores it (CRLF line ends, header block, empty line, body). `split_message`
returns its header fields (each with its folded continuation lines, without the final CRLF) and the body.
`relaxed_header` and `relaxed_body` are the "relaxed" algorithms; `select_headers` picks the fields a signature
covers, in the order RFC 6376 5.4.2 prescribes (for a name listed n times, the last n instances, bottom up).

Failure modes: none raised. A message without an empty line is all header (its body is empty); a header line
without a colon is kept as a field (it is not signed, since its name matches nothing).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WSP_RUN = re.compile(rb"[ \t]+")
_TRAILING_WSP = re.compile(rb" \r\n")
_FOLD = re.compile(rb"\r\n(?=[ \t])")


def split_message(message: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, body). Each field keeps its continuation lines; the CRLF that ends it is dropped."""
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head, body = message.removesuffix(b"\r\n"), b""
    else:
        head, body = message[:end], message[end + 4:]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, body


def field_name(header_field: bytes) -> bytes:
    """The field's name, lower-cased (b"" when the line has no colon)."""
    name, colon, _ = header_field.partition(b":")
    return name.strip().lower() if colon else b""


def relaxed_header(header_field: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfold, runs of WSP to one SP, no WSP around the colon or at the end."""
    name, _, value = header_field.partition(b":")
    if b"\r" in value or b"\t" in value or b"  " in value:  # else only the ends need trimming
        value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value))
    return name.strip(b" \t").lower() + b":" + value.strip(b" ") + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: runs of WSP to one SP, no WSP at line ends, no empty lines at the end; CRLF-terminated."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if b"\t" in body or b"  " in body or b" \r\n" in body:  # else the substitutions change nothing
        body = _TRAILING_WSP.sub(b"\r\n", _WSP_RUN.sub(b" ", body))
    end = len(body)
    while end >= 4 and body[end - 4:end] == b"\r\n\r\n":
        end -= 2
    return b"" if body[:end] == b"\r\n" else body[:end]


def select_headers(fields: Sequence[bytes], names: Sequence[str], oversign: Sequence[str] = ("from",)
                   ) -> tuple[list[str], list[bytes]]:
    """The h= list and the fields it covers, in hashing order (RFC 6376 5.4.2).

    Every instance of every name in `names` (lower-case) is signed; names in `oversign` are listed once more
    than they occur, so that a field of that name added later breaks the signature (RFC 6376 8.15).
    """
    by_name: dict[str, list[bytes]] = {}
    for header_field in fields:
        by_name.setdefault(field_name(header_field).decode("latin-1"), []).append(header_field)
    listed: list[str] = []
    covered: list[bytes] = []
    for name in names:
        instances = by_name.get(name)
        if instances is not None:
            # Bottom-most first: a verifier matches the n-th listing of a name to its n-th instance from the
            # bottom.
            for instance in reversed(instances):
                listed.append(name)
                covered.append(instance)
        if name in oversign:
            listed.append(name)
    return listed, covered
