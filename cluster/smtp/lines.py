"""Line framing for the SMTP server: command lines and DATA content, from a byte buffer.

RFC 5321 2.3.8: only CRLF ends a line. A bare CR, a bare LF or a NUL never ends anything; in a command line
it makes the line invalid, in DATA it makes the message invalid (the SMTP smuggling defence, CVE-2023-51764:
a "\\n.\\n" or "\\r.\\r\\n" inside the data can never end it, so no second message can be hidden in it).

`CommandFramer.next_line(buffer)` removes one CRLF-terminated line from the buffer and returns it, returns
`OVERLONG` once an over-long line has been discarded up to its CRLF, or None when more bytes are needed.

`DataReader.feed(buffer)` consumes message data and returns a `DataResult` once "CRLF.CRLF" was seen (the
DATA command's CRLF counts as the first one), or None when more bytes are needed. It never holds more than
`max_message_size` bytes of message plus one text line: over-size data is counted and dropped. Runs of
lines that cannot hold a terminator or a stuffed dot (no line in them starts with ".") are checked and copied
as one block (a big block checked by numpy in place and copied once: cluster/smtp/blockscan.py), so a 1 MiB
message costs well under a millisecond of scanning.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cluster.smtp.blockscan import BIG_BLOCK, scan_block
from cluster.smtp.scan import find_dot_line

CRLF = b"\r\n"
_FORBIDDEN = (b"\r", b"\n", b"\x00")


class Framing(Enum):
    OVERLONG = "overlong"


OVERLONG = Framing.OVERLONG


class CommandFramer:
    """Splits the command stream into lines of at most `max_line` octets (CRLF included)."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._discarding = False

    def next_line(self, buffer: bytearray) -> bytes | Framing | None:
        end = buffer.find(CRLF)
        if self._discarding:
            if end < 0:
                # Keep a trailing CR: it may be the first half of the CRLF that ends the long line.
                keep = 1 if buffer.endswith(b"\r") else 0
                del buffer[: len(buffer) - keep]
                return None
            del buffer[: end + 2]
            self._discarding = False
            return OVERLONG
        if end < 0:
            if len(buffer) >= self.max_line:
                # No CRLF within max_line octets: this line is too long whatever follows.
                self._discarding = True
                return self.next_line(buffer)
            return None
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        if end + 2 > self.max_line:
            return OVERLONG
        return line

    @staticmethod
    def has_forbidden_octets(line: bytes) -> bool:
        return b"\r" in line or b"\n" in line or b"\x00" in line


@dataclass(frozen=True)
class DataResult:
    """The outcome of one DATA phase. `data` is None when the message must be refused (see the flags)."""

    data: bytes | None
    size: int
    bare_line_ending: bool
    line_too_long: bool
    too_big: bool
    has_8bit: bool


class DataReader:
    """Reads DATA content up to CRLF.CRLF, dot-unstuffing (RFC 5321 4.5.2) and checking limits."""

    def __init__(self, max_text_line: int, max_message_size: int) -> None:
        self.max_text_line = max_text_line
        self.max_message_size = max_message_size
        # The message as pieces, joined once at the end: a bytearray grown to 1 MiB is copied again each time
        # its heap block cannot grow in place.
        self._pieces: list[bytes] = []
        self._size = 0
        self._at_line_start = True
        self._current_line_length = 0  # wire octets of the current line seen so far (partial lines)
        self._bare_line_ending = False
        self._line_too_long = False
        self._too_big = False
        self._has_8bit = False

    def feed(self, buffer: bytearray) -> DataResult | None:
        while True:
            if self._at_line_start and buffer.startswith(b"."):
                # A line starting with "." is either the terminator or dot-stuffed: handle it on its own.
                end = buffer.find(CRLF)
                if end < 0:
                    self._consume_partial(buffer)
                    return None
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if line == b".":
                    return self._result()
                self._consume_piece(line, complete=True)
                continue
            # Otherwise take every complete line up to the next one starting with "." in one block.
            next_dot_line = find_dot_line(buffer)
            block_end = next_dot_line + 2 if next_dot_line >= 0 else buffer.rfind(CRLF) + 2
            if block_end < 2:
                self._consume_partial(buffer)
                return None
            if block_end >= BIG_BLOCK:
                self._consume_big_block(buffer, block_end)
                continue
            with memoryview(buffer) as view:  # one copy (a bytearray slice would be a second)
                block = view[:block_end].tobytes()
            del buffer[:block_end]
            self._consume_block(block)

    def _consume_big_block(self, buffer: bytearray, end: int) -> None:
        """As `_consume_block` for buffer[:end], checked in place (scan_block) and copied once, into the body."""
        scan = scan_block(buffer, end, self.max_text_line)
        if scan.bare:
            self._bare_line_ending = True
        if scan.eight_bit:
            self._has_8bit = True
        if not self._line_too_long:
            if self._bare_line_ending:  # line lengths by LF are not the lines: count them exactly (rare)
                self._line_too_long = self._has_long_line(bytes(buffer[:end]))
            elif self._current_line_length + scan.first > self.max_text_line or scan.too_long:
                self._line_too_long = True
        self._current_line_length = 0
        self._at_line_start = True
        with memoryview(buffer) as view:
            self._append(view[:end].tobytes())
        del buffer[:end]

    def _consume_block(self, block: bytes) -> None:
        """Complete lines, none of them starting with "." at a line start; the block ends with CRLF."""
        lines = block.count(CRLF)
        # Each line ends in exactly one CRLF, so any other CR or LF is bare (RFC 5321 2.3.8).
        if block.count(b"\r") != lines or block.count(b"\n") != lines or b"\x00" in block:
            self._bare_line_ending = True
        if not self._has_8bit and not block.isascii():
            self._has_8bit = True
        if not self._line_too_long and self._has_long_line(block):
            self._line_too_long = True
        self._current_line_length = 0
        self._at_line_start = True
        self._append(block)

    def _has_long_line(self, block: bytes) -> bool:
        """Whether a line of the block is longer than a text line (the first one continues the current line).

        Without splitting the block into lines (a bytes object per line): when every LF ends a CRLF, a line
        over the limit M is a run of at least M octets without LF (its text and CR), and such a run covers
        one of the windows of (M + 1) // 2 octets laid end to end from the block's start entirely. Only a
        window with no LF (or bare line endings) sends the block to the exact line-by-line count."""
        limit = self.max_text_line
        if self._current_line_length + block.find(CRLF) + 2 > limit:
            return True
        if not self._bare_line_ending:
            step = (limit + 1) // 2
            if all(block.find(b"\n", start, start + step) >= 0 for start in range(0, len(block), step)):
                return False
        lines = block.split(CRLF)
        lines.pop()  # the empty string after the final CRLF
        return max(self._current_line_length + len(lines[0]), max(map(len, lines))) + 2 > limit

    def _consume_partial(self, buffer: bytearray) -> None:
        """Consume an unterminated piece once it is longer than a text line, so memory stays bounded."""
        if len(buffer) <= self.max_text_line:
            return
        # Keep a trailing CR: it may start the CRLF that ends this line.
        keep = 1 if buffer.endswith(b"\r") else 0
        piece = bytes(buffer[: len(buffer) - keep])
        del buffer[: len(buffer) - keep]
        self._consume_piece(piece, complete=False)

    def _consume_piece(self, piece: bytes, *, complete: bool) -> None:
        self._current_line_length += len(piece)
        if self._at_line_start and piece.startswith(b"."):
            piece = piece[1:]  # RFC 5321 4.5.2: the client doubled a leading dot
        if any(octet in piece for octet in _FORBIDDEN):
            self._bare_line_ending = True
        if not self._has_8bit and not piece.isascii():
            self._has_8bit = True
        if complete:
            if self._current_line_length + 2 > self.max_text_line:
                self._line_too_long = True
            piece += CRLF
            self._current_line_length = 0
        self._at_line_start = complete
        self._append(piece)

    def _append(self, data: bytes) -> None:
        """Count `data` and keep it, unless the message is already refused (then nothing is buffered)."""
        self._size += len(data)
        if self._size > self.max_message_size:
            self._too_big = True
        if self._too_big or self._bare_line_ending or self._line_too_long:
            self._pieces.clear()
        else:
            self._pieces.append(data)

    def _result(self) -> DataResult:
        refused = self._bare_line_ending or self._line_too_long or self._too_big
        return DataResult(
            data=None if refused else b"".join(self._pieces),
            size=self._size,
            bare_line_ending=self._bare_line_ending,
            line_too_long=self._line_too_long,
            too_big=self._too_big,
            has_8bit=self._has_8bit,
        )


class ChunkReader:
    """Reads the octets of BDAT chunks (RFC 3030 2): exact counts, no dot-stuffing, no terminator.

    One reader spans all chunks of a message. The same rules as DATA apply to the content (only CRLF ends a
    line, text line and message size limits), checked incrementally so a CR at the end of one chunk and an LF
    at the start of the next still make one CRLF. With `keep=False` (a refused BDAT) the chunk is only
    counted off and discarded. Memory stays bounded by `max_message_size`.
    """

    def __init__(self, max_text_line: int, max_message_size: int) -> None:
        self.max_text_line = max_text_line
        self.max_message_size = max_message_size
        self._pieces: list[bytes] = []  # joined once, at the end (as DataReader's)
        self._size = 0
        self._remaining = 0
        self._keep = True
        self._carry_cr = False  # the last octet seen was a CR that may start a CRLF
        self._current_line_length = 0
        self.bare_line_ending = False
        self.line_too_long = False
        self.too_big = False
        self._has_8bit = False

    @property
    def refused(self) -> bool:
        return self.bare_line_ending or self.line_too_long or self.too_big

    def start_chunk(self, size: int, *, keep: bool) -> None:
        self._remaining = size
        self._keep = keep

    def feed(self, buffer: bytearray) -> bool:
        """Consume up to the rest of the current chunk from `buffer`; True once the chunk is complete."""
        take = min(self._remaining, len(buffer))
        with memoryview(buffer) as view:  # one copy (a bytearray slice would be a second)
            piece = view[:take].tobytes()
        del buffer[:take]
        self._remaining -= take
        if self._keep and piece:
            if len(piece) < BIG_BLOCK or not self._check_big(piece):
                self._check(piece)
            self._size += len(piece)
            if self._size > self.max_message_size:
                self.too_big = True
            if self.refused:
                self._pieces.clear()
            else:
                self._pieces.append(piece)
        return self._remaining == 0

    def _check_big(self, piece: bytes) -> bool:
        """`_check` for a big piece, its complete lines scanned by numpy (cluster/smtp/blockscan.py); False,
        having changed nothing, when the piece needs the exact line-by-line `_check` (a bare CR, LF or NUL: the
        line lengths by LF are then not the lines; or no LF in it)."""
        start = 1 if self._carry_cr and piece.startswith(b"\n") else 0  # the CRLF the last chunk began
        end = piece.rfind(b"\n") + 1
        if (self._carry_cr and not start) or end <= start:
            return False
        tail = piece[end:]  # the start of a line, no LF in it
        carry = tail.endswith(b"\r")
        text = tail[:-1] if carry else tail
        scan = scan_block(piece, end, self.max_text_line, start)
        if scan.bare or b"\r" in text or b"\x00" in text:
            return False
        limit = self.max_text_line
        if start:  # the carried CR ended its line (whose length the last piece's check counted)
            self._current_line_length = 0
        if self._current_line_length + scan.first > limit or scan.too_long:
            self.line_too_long = True
        if scan.eight_bit or not text.isascii():
            self._has_8bit = True
        self._carry_cr = carry
        self._current_line_length = len(text)
        if self._current_line_length + 2 > limit:
            self.line_too_long = True
        return True

    def _check(self, piece: bytes) -> None:
        text = (b"\r" if self._carry_cr else b"") + piece
        self._carry_cr = text.endswith(b"\r")
        if self._carry_cr:
            text = text[:-1]
        pairs = text.count(CRLF)
        if text.count(b"\r") != pairs or text.count(b"\n") != pairs or b"\x00" in text:
            self.bare_line_ending = True
        if not self._has_8bit and not text.isascii():
            self._has_8bit = True
        lines = text.split(CRLF)
        if len(lines) == 1:
            self._current_line_length += len(lines[0])
        else:
            longest = max(self._current_line_length + len(lines[0]), max(map(len, lines[1:-1]), default=0))
            if longest + 2 > self.max_text_line:
                self.line_too_long = True
            self._current_line_length = len(lines[-1])
        if self._current_line_length + 2 > self.max_text_line:
            self.line_too_long = True

    def result(self, *, final: bool = True) -> DataResult:
        """The whole message after the LAST chunk (`final`), or the verdict on a chunk that broke a rule.

        A final line without CRLF gets one (RFC 5322 2.1: a message is made of CRLF-terminated lines).
        """
        if final and self._carry_cr:
            # The message ended in a CR that no LF followed: a bare CR, and part of the last line.
            self.bare_line_ending = True
            self._current_line_length += 1
            if self._current_line_length + 2 > self.max_text_line:
                self.line_too_long = True
        if self._current_line_length and not self.refused:
            self._pieces.append(CRLF)
        refused = self.refused
        return DataResult(
            data=None if refused else b"".join(self._pieces),
            size=self._size,
            bare_line_ending=self.bare_line_ending,
            line_too_long=self.line_too_long,
            too_big=self.too_big,
            has_8bit=self._has_8bit,
        )
