"""Fuzz target: the sans-I/O SMTP client machine (cluster/smtp/client.py) as a delivery session drives it.

Input: a series of steps chosen by the fuzz bytes: build a command (arguments from the fuzz bytes), send a
message body, or receive server bytes (well-formed replies, mangled ones or raw bytes) and read the replies.

Invariants: the only exceptions are the documented ones (`SmtpProtocolError` for a server that breaks the
protocol, `ValueError` for a command argument holding CR, LF or NUL); a command on the wire is one line ended by
CRLF with no other CR or LF in it; a sent message ends with CRLF.CRLF and, once un-stuffed, is the body (with a
final CRLF added) whenever the body's only line ends are CRLF; every reply read has a code from 200 to 599 and
text lines without CR or LF; `Capabilities.from_ehlo` accepts any reply and gives a size limit that is None or
not negative; replies come out in the order the commands went in.
"""

from __future__ import annotations

from cluster.smtp.client import Capabilities, ClientConnection, Command, SmtpProtocolError
from fuzz.common import CRLF, Choices, crlf_lines

REPLIES = (b"220 mx.example ESMTP\r\n", b"250 OK\r\n", b"250-mx.example\r\n250-SIZE 1000\r\n250-PIPELINING\r\n"
           b"250 STARTTLS\r\n", b"354 go\r\n", b"421 bye\r\n", b"550 5.1.1 no\r\n", b"250-SIZE\r\n250 SIZE x\r\n",
           b"250\r\n", b"334 \r\n", b"250 ok\n", b"2500 x\r\n", b"250-a\r\n251 b\r\n")
BODIES = (b"", b"Subject: x\r\n\r\nbody\r\n", b".\r\n", b"..\r\n.\r\n", b"no final line end", b"a\nb\r\n",
          b".leading\r\n.\r\n.x", b"\r\n.\r\n")


def fuzz_one(data: bytes) -> None:
    choices = Choices(data)
    conn = ClientConnection(expect_greeting=choices.flag())
    expected: list[str] = ["greeting"] if conn.awaiting else []
    broken = False
    while not choices.exhausted:
        step = choices.below(5)
        if step == 0:
            argument = choices.chunk(60).decode("utf-8", "replace")
            builder = (Command.ehlo, Command.helo, Command.mail, Command.rcpt)[choices.below(4)]
            try:
                command = builder(argument)
            except ValueError:
                assert any(ch in argument for ch in "\r\n\0"), f"ValueError for a clean argument {argument!r}"
                continue
            check_command(conn.send(command))
            expected.append(command.verb)
        elif step == 1:
            command = (Command.data(), Command.rset(), Command.noop(), Command.quit(), Command.starttls())[
                choices.below(5)]
            check_command(conn.send(command))
            expected.append(command.verb)
        elif step == 2:
            body = choices.pick(BODIES) if choices.flag() else choices.chunk()
            check_message(body, conn.send_message(body))
            expected.append("message")
        elif step == 3 and not broken:
            incoming = choices.pick(REPLIES) if choices.flag() else choices.chunk()
            try:
                conn.receive_data(incoming)
                while (answer := conn.next_reply()) is not None:
                    verb, reply = answer
                    assert expected and verb == expected.pop(0), f"reply for {verb}, expected {expected[:1]}"
                    assert 200 <= reply.code <= 599, reply
                    assert all("\r" not in line and "\n" not in line for line in reply.lines), reply
                    capabilities = Capabilities.from_ehlo(reply)
                    assert capabilities.size_limit is None or capabilities.size_limit >= 0
            except SmtpProtocolError as exc:
                assert str(exc), "SmtpProtocolError without a message"
                broken = True  # a real session closes the connection here
        assert conn.awaiting == len(expected), (conn.awaiting, expected)


def check_command(wire: bytes) -> None:
    assert wire.endswith(CRLF) and wire.count(b"\r") == 1 and wire.count(b"\n") == 1, f"command line {wire!r}"


def check_message(body: bytes, wire: bytes) -> None:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n", f"message end {wire[-10:]!r}"
    if b"\r" in body.replace(CRLF, b"") or b"\n" in body.replace(CRLF, b""):
        return  # bare CR or LF in the body: the sender's problem (the frontend refuses such input)
    lines = crlf_lines(wire, "sent message")
    assert lines[-1] == b".", lines[-1:]
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines[:-1]]
    expected = body if not body or body.endswith(CRLF) else body + CRLF
    assert b"".join(line + CRLF for line in unstuffed) == expected, "dot-stuffing did not round-trip"
