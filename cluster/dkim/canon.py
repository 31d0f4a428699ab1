"""DKIM relaxed canonicalization and header field selection (RFC 6376 3.4.2, 3.4.4, 3.7, 5.4.2). Pure: bytes
in, bytes out.

Input: a message as the frontend stores it (CRLF line ends, header block, empty line, body). `split_message`
returns its header fields (each with its folded continuation lines, without the final CRLF) and the body.
`relaxed_header` and `relaxed_body` are the "relaxed" algorithms, `body_hash` the SHA-256 of the relaxed body
(the bh= tag); `select_headers` picks the fields a signature covers, in the order RFC 6376 5.4.2 prescribes (for
a name listed n times, the last n instances, bottom up).

Cost (it runs once per signed message, on the frontend's event loop): every step is a C-level bytes operation
over the whole message at most once or twice (split, `in` tests, regex substitutions only where they would
change something, hashlib over a view of the body), and Python loops run per header field, never per body
line. A body with no space or tab at all, the usual machine-made message, is hashed as it is, without a copy.

Failure modes: none raised. A message without an empty line is all header (its body is empty); a header line
without a colon is kept as a field (it is not signed, since its name matches nothing).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence

_WSP_RUN = re.compile(rb"[ \t]+")
_TRAILING_WSP = re.compile(rb" \r\n")
_FOLD = re.compile(rb"\r\n(?=[ \t])")
# The CRLF that ends a header field: one not followed by a continuation line (RFC 5322 2.2.3).
_FIELD_END = re.compile(rb"\r\n(?![ \t])")


def split_message(message: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, body). Each field keeps its continuation lines; the CRLF that ends it is dropped."""
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head, body = message.removesuffix(b"\r\n"), b""
    else:
        head, body = message[:end], message[end + 4:]
    return _FIELD_END.split(head), body


def field_name(header_field: bytes) -> bytes:
    """The field's name, lower-cased (b"" when the line has no colon)."""
    name, colon, _ = header_field.partition(b":")
    return name.strip().lower() if colon else b""


def relaxed_header(header_field: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfold, runs of WSP to one SP, no WSP around the colon or at the end."""
    name, _, value = header_field.partition(b":")
    return name.strip(b" \t").lower() + b":" + _relaxed_value(value) + b"\r\n"


def _relaxed_value(value: bytes) -> bytes:
    if b"\r" in value or b"\t" in value or b"  " in value:  # else only the ends need trimming
        value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value))
    return value.strip(b" ")


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: runs of WSP to one SP, no WSP at line ends, no empty lines at the end; CRLF-terminated."""
    body, end, add_crlf = _relaxed_body_span(body)
    return body[:end] + b"\r\n" if add_crlf else body[:end]


def body_hash(body: bytes) -> bytes:
    """SHA-256 of `relaxed_body(body)` (RFC 6376 3.7), hashed from a view of the body: no copy of it is made
    unless whitespace has to change."""
    body, end, add_crlf = _relaxed_body_span(body)
    digest = hashlib.sha256(memoryview(body)[:end])
    if add_crlf:
        digest.update(b"\r\n")
    return digest.digest()


def _relaxed_body_span(body: bytes) -> tuple[bytes, int, bool]:
    """(body with its whitespace canonicalized, the length of it that the canonical body keeps, whether a CRLF
    follows that), so the caller can hash without copying."""
    # memchr-speed tests first: a body without any space or tab needs no substitution at all.
    if (b" " in body or b"\t" in body) and (b"\t" in body or b"  " in body or b" \r\n" in body
                                             or body.endswith(b" ")):
        body = _WSP_RUN.sub(b" ", body)
        body = _TRAILING_WSP.sub(b"\r\n", body).removesuffix(b" ")
    if not body:
        return body, 0, False
    if not body.endswith(b"\r\n"):
        return body, len(body), True  # its last line is not empty: nothing to strip
    end = len(body)
    while end >= 4 and body[end - 4:end] == b"\r\n\r\n":
        end -= 2
    return body, (0 if end == 2 else end), False


def select_headers(fields: Sequence[bytes], names: Sequence[str], oversign: Collection[str] = ("from",)
                   ) -> tuple[list[str], list[bytes]]:
    """The h= list and the fields it covers, in hashing order (RFC 6376 5.4.2).

    Every instance of every name in `names` (lower-case) is signed; names in `oversign` are listed once more
    than they occur, so that a field of that name added later breaks the signature (RFC 6376 8.15).
    """
    return select_from(fields_by_name(fields, frozenset(names)), names, oversign)


def select_from(by_name: Mapping[str, list[bytes]], names: Sequence[str], oversign: Collection[str] = ("from",)
                ) -> tuple[list[str], list[bytes]]:
    """`select_headers` over fields already grouped by `fields_by_name`."""
    listed: list[str] = []
    covered: list[bytes] = []
    # A message has a few of the two dozen names RFC 6376 5.4.1 lists: pick those first, at C speed.
    for name in [n for n in names if n in by_name or n in oversign]:
        instances = by_name.get(name)
        if instances is not None:
            # Bottom-most first: a verifier matches the n-th listing of a name to its n-th instance from the
            # bottom.
            listed += [name] * len(instances)
            covered += reversed(instances)
        if name in oversign:
            listed.append(name)
    return listed, covered


def fields_by_name(fields: Sequence[bytes], wanted: Collection[str]) -> dict[str, list[bytes]]:
    """The fields whose (lower-cased) name is in `wanted`, by name, in message order."""
    by_name: dict[str, list[bytes]] = {}
    for header_field in fields:
        colon = header_field.find(b":")
        if colon > 0:
            name = header_field[:colon].strip().lower().decode("latin-1")
            if name in wanted:
                if name in by_name:
                    by_name[name].append(header_field)
                else:
                    by_name[name] = [header_field]
    return by_name
