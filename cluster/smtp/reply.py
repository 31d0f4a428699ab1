"""An SMTP reply: a three-digit code, an optional RFC 3463 enhanced status code and text lines.

Used both ways: the server formats its replies with `Reply.to_bytes()`, the client builds `Reply` objects
from what a remote server sent (`Reply.from_lines`).
"""

from __future__ import annotations

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
        """All lines joined with a space: the server's words, for logs and DSN Diagnostic-Code."""
        return " ".join(line for line in self.lines if line)

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
        """RFC 5321 4.2.1: "code-text" for every line but the last, "code text" for the last."""
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for index, line in enumerate(self.lines):
            sep = " " if index == len(self.lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

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
