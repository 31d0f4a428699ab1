"""What the sans-I/O protocol machines (SMTP server, POP3 server) share: byte buffers and the event loop.

The glue calls `receive_data(bytes)` (b"" at EOF), then `next_event()` until it returns `NeedData`, answers
decision events, and sends `data_to_send()` (h11's calling convention). A subclass supplies `closed`,
`_step()` (consume some input, queue events or output; False when nothing more can be done without more
bytes) and, if it pauses for more than a pending decision, `_paused()`.

Shared by both protocols: `ProtocolUsageError` (the glue called a machine wrongly: a bug in the glue, never
caused by client input), `SessionEnded` (the informational last event), and the STARTTLS input rule
(`_discard_plaintext_before_tls`; its glue half is `cluster.tls.start_tls`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

EventT = TypeVar("EventT")
DecisionT = TypeVar("DecisionT")


class NeedData:
    """Sentinel: no event until more bytes arrive."""


class Paused:
    """Sentinel: a decision event awaits the glue's answer; input is buffered but not processed."""


class ProtocolUsageError(RuntimeError):
    """The glue called a state machine wrongly (e.g. an answer with no matching decision pending)."""


@dataclass(frozen=True)
class SessionEnded:
    """Informational: the session is over; the glue flushes `data_to_send()` and closes.

    `reason` says why, in words fit for a log line (each machine documents its reasons).
    """

    reason: str


class ByteMachine(Generic[EventT, DecisionT]):
    def __init__(self) -> None:
        self._input = bytearray()
        self._output = bytearray()
        self._eof = False
        self._events: deque[EventT] = deque()
        self._pending: DecisionT | None = None

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        if data:
            self._input += data
        else:
            self._eof = True

    @property
    def buffered_input(self) -> int:
        """Bytes received and not consumed yet (e.g. what a client pipelined behind a command)."""
        return len(self._input)

    def data_to_send(self) -> bytes:
        out = bytes(self._output)
        self._output.clear()
        return out

    def next_event(self) -> EventT | type[NeedData] | type[Paused]:
        while True:
            if self._events:
                return self._events.popleft()
            if self._paused():
                return Paused
            if self.closed or not self._step():
                return NeedData

    def _paused(self) -> bool:
        return self._pending is not None

    def _discard_plaintext_before_tls(self) -> None:
        """RFC 3207 4.2, RFC 2595 4 (CVE-2011-0411): once the machine has accepted STARTTLS/STLS, whatever the
        client pipelined behind it arrived in plaintext and must not be executed inside the TLS session.
        The glue drops what its stream buffered since (`cluster.tls.start_tls`)."""
        self._input.clear()

    def _step(self) -> bool:
        raise NotImplementedError
