"""What the fuzz targets share: a reader that turns fuzz bytes into choices, and line and reply checks."""

from __future__ import annotations

import re

CRLF = b"\r\n"
# RFC 5321 4.2: Reply-code, then "-" (more lines follow) or SP (last line) and a textstring of HT, SP and
# printable US-ASCII; a last line may be the bare code.
_SMTP_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])([\t\x20-\x7e]*))?\Z")
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
MAX_SMTP_REPLY_LINE = 512


class Choices:
    """Fuzz bytes consumed front to back as small decisions; reads past the end give zeros / empty bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self.data)

    def byte(self) -> int:
        if self.exhausted:
            return 0
        value = self.data[self.position]
        self.position += 1
        return value

    def below(self, limit: int) -> int:
        return self.byte() % limit if limit > 0 else 0

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def take(self, count: int) -> bytes:
        piece = self.data[self.position:self.position + count]
        self.position += len(piece)
        return piece

    def chunk(self, longest: int = 255) -> bytes:
        """A length byte, then that many bytes (fewer at the end of the input)."""
        return self.take(min(self.byte(), longest))

    def pick(self, options: tuple[bytes, ...] | list[bytes]) -> bytes:
        return options[self.below(len(options))]

    def rest(self) -> bytes:
        piece = self.data[self.position:]
        self.position = len(self.data)
        return piece


def crlf_lines(output: bytes, what: str) -> list[bytes]:
    """The lines of `output`, checking that CRLF ends every one of them and no bare CR or LF is inside."""
    if not output:
        return []
    assert output.endswith(CRLF), f"{what}: output does not end with CRLF: {output[-40:]!r}"
    lines = output[:-2].split(CRLF)
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, f"{what}: bare CR or LF in line {line[:80]!r}"
    return lines


def smtp_replies(output: bytes, what: str) -> list[tuple[int, list[bytes]]]:
    """Whole SMTP replies (code, text lines) from server output; every line must be well-formed."""
    replies: list[tuple[int, list[bytes]]] = []
    code: bytes | None = None
    texts: list[bytes] = []
    for line in crlf_lines(output, what):
        assert len(line) + 2 <= MAX_SMTP_REPLY_LINE, f"{what}: reply line of {len(line) + 2} octets: {line[:80]!r}"
        match = _SMTP_REPLY_LINE.match(line)
        assert match is not None, f"{what}: malformed reply line {line[:80]!r}"
        assert code is None or match.group(1) == code, f"{what}: code changes inside a reply: {line[:80]!r}"
        code = match.group(1)
        texts.append(match.group(3) or b"")
        if match.group(2) != b"-":
            replies.append((int(code), texts))
            code, texts = None, []
    assert code is None, f"{what}: output ends inside a multi-line reply"
    return replies
