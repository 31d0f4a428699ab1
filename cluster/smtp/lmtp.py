"""Sans-I/O LMTP server state machine (RFC 2033): the SMTP server machine with LHLO and per-recipient replies.

LMTP is SMTP for the last hop into a mailbox store, with two differences this module makes and nothing else
(command parsing, limits, PIPELINING, SIZE, 8BITMIME, STARTTLS, errors: all `cluster.smtp.server`):
- RFC 2033 4.1: the greeting command is LHLO; HELO and EHLO are unknown commands (500 5.5.2).
- RFC 2033 4.2: after the final "." the server answers once for every recipient that RCPT accepted, in RCPT
  order, each reply saying whether that recipient's copy was stored. So `MessageReceived` is answered with
  `respond_recipients([reply, ...])` (one per `event.recipients`), never with `respond()`. A message the
  machine refuses itself (too big, bare CR/LF, overlong line) gets the refusal once per recipient too.
  DATA with no accepted recipient gets 503 (RFC 2033 4.2), not SMTP's 554.

The calling protocol is the SMTP server's (see its docstring). Failure modes: as there; answering
`MessageReceived` with `respond()` or with the wrong number of replies is a glue bug (`ProtocolUsageError`).
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.smtp import replies
from cluster.smtp.events import MessageReceived
from cluster.smtp.replies import Reply
from cluster.smtp.server import ProtocolUsageError, ServerConnection, ServerSettings, SessionObserver, State

__all__ = ["LmtpServerConnection"]


class LmtpServerConnection(ServerConnection):
    def __init__(self, settings: ServerSettings, observer: SessionObserver | None = None) -> None:
        super().__init__(settings, observer)
        # A copy of the SMTP command table (the class's, shared by every SMTP session): LHLO instead of
        # EHLO/HELO, and DATA with no valid recipient answered the LMTP way.
        handlers = {verb: handler for verb, handler in self._handlers.items() if verb not in ("EHLO", "HELO")}
        handlers["LHLO"] = ServerConnection._ehlo
        handlers["DATA"] = _lmtp_data
        self._handlers = handlers

    def start(self) -> None:
        self._send(replies.lmtp_greeting(self.settings.hostname))

    def respond(self, reply: Reply) -> None:
        if isinstance(self._pending, MessageReceived):
            raise ProtocolUsageError("LMTP answers the end of data once per recipient: use respond_recipients()")
        super().respond(reply)

    def respond_recipients(self, answers: Sequence[Reply]) -> None:
        """Answer the pending `MessageReceived`: one reply per recipient, in the order of `event.recipients`."""
        event = self._pending
        if not isinstance(event, MessageReceived):
            if self.closed:
                return
            raise ProtocolUsageError("respond_recipients() called with no message pending")
        if len(answers) != len(event.recipients):
            raise ProtocolUsageError(f"{len(answers)} replies for {len(event.recipients)} recipients")
        self._pending = None
        self._end_transaction()  # RFC 5321 4.1.1.4: the transaction is over
        for answer in answers:
            self._send(answer)

    def _refuse_message(self, reply: Reply, recipients: int) -> None:
        for _ in range(recipients - 1):
            self._send(reply)
        self._error(reply)  # counted once: one client mistake


def _lmtp_data(session: ServerConnection, argument: str) -> None:
    """DATA after MAIL with no accepted recipient: LMTP's own reply (RFC 2033 4.2); else SMTP's DATA."""
    if session.state is State.MAIL and not argument.strip(" "):
        session._error(replies.LMTP_NO_VALID_RECIPIENTS)
        return
    session._data(argument)
