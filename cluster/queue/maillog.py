"""The delivery log: one line per recipient outcome, Postfix-style, grep-able by queue id (ARCHITECTURE.md
contract 8); ledger.py counts the same outcomes in mtacluster_queue_outcomes_total{status}.

    0A1B2C3D4E5F6G00: to=<bob@example.net>, relay=mx.example.net[192.0.2.7]:25, delay=1.2,
        delays=0.01/0.03/0.4/0.76, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4F2A)

(one line in the log). A job that left from an egress source of a pool says so after the relay:
`relay=..., source=NAME, delay=...` (the source the shard chose: cluster/queue/shaping.py).
status is sent, deferred, bounced or expired for delivery outcomes, and deleted, held,
released for admin actions (`QUEUEID: to=<...>, status=held (by the queue administrator)`); a flush is
counted per recipient but logs one line for all it made ready (admin.py).
delay: seconds since the message arrived; delays=a/b/c/d: a = queued before this attempt was dispatched,
b = from dispatch to the start of the SMTP work (bus, waiting in the worker), c = connection setup (DNS, hosts
tried, greeting, EHLO, STARTTLS), d = the SMTP transaction; c and d are measured by the worker.
The same facts go into the record as `extra={"fields": ...}`, which the JSON log format writes as fields
(cluster/logs.py). With the text format, a line goes straight to the log handler (`logs.direct`: the same
text, without the logging module's record and formatter, a third of the shard's CPU with 100 recipients per
message). Inputs: the change the ledger has just committed. No failure modes.
"""

from __future__ import annotations

import logging
from typing import Any

from cluster.bus.schemas import Outcome
from cluster.logs import FIELDS, direct, structured
from cluster.queue.records import LastOutcome

log = logging.getLogger("mtacluster.queue")

DELIVERY_STATUSES = ("sent", "deferred", "bounced", "expired")
ADMIN_STATUSES = ("deleted", "held", "released", "flushed")


def seconds(value: float) -> str:
    """Postfix's way: two decimals at most, no trailing zeros, whole seconds from 100 on.

    Remembered by value (up to SECONDS_KEPT of them): the recipients of one job share their delays, so a
    100-recipient Result asks for the same few values a hundred times each."""
    text = _seconds_text.get(value)
    if text is None:
        if len(_seconds_text) >= SECONDS_KEPT:
            _seconds_text.clear()
        text = _seconds_text[value] = _seconds(value)
    return text


SECONDS_KEPT = 4096
_seconds_text: dict[float, str] = {}


def _seconds(value: float) -> str:
    if value >= 100:
        return str(round(value))
    if value <= 0.0:
        return "0"
    text = f"{value:.2f}"
    if text[-1] != "0":
        return text
    return text.rstrip("0").rstrip(".") or "0"


class _Tails:
    """The text after `to=<...>, ` of the last line written: the recipients of one job share relay, delays, DSN,
    status and reply, so a 100-recipient Result builds it once instead of a hundred times (with five delay
    texts each)."""

    def __init__(self) -> None:
        self._key: tuple[str, float, tuple[float, float, float, float], str, str, str] | None = None
        self._text = ""

    def tail(self, shown: str, delay: float, delays: tuple[float, float, float, float], dsn: str, status: str,
             reply: str) -> str:
        key = (shown, delay, delays, dsn, status, reply)
        if key != self._key:
            a, b, c, d = delays
            self._text = (f"relay={shown}, delay={seconds(delay)}, delays={seconds(a)}/{seconds(b)}/{seconds(c)}/"
                          f"{seconds(d)}, dsn={dsn or '-'}, status={status} ({reply})")
            self._key = key
        return self._text


_tails = _Tails()


def record(queue_id: str, address: str, status: str, last: LastOutcome | None, attempts: int,
           arrival: float, now: float, dispatched_at: float = 0.0, outcome: Outcome | None = None,
           source: str = "") -> None:
    """Log one outcome (the ledger counts it in mtacluster_queue_outcomes_total{status})."""
    if not log.isEnabledFor(logging.INFO):
        return
    reply = last.reply if last is not None else ""
    if status not in DELIVERY_STATUSES:
        text = last.text if status == "deleted" and last is not None else "by the queue administrator"
        extra = {FIELDS: {"queue_id": queue_id, "to": address, "status": status, "attempts": attempts,
                          "reply": text}} if structured() else None
        log.info("%s: to=<%s>, status=%s (%s)", queue_id, address, status, text, extra=extra)
        return
    relay = "none"
    connect = transfer = 0.0
    if outcome is not None:
        connect, transfer = outcome.connect_seconds, outcome.transfer_seconds
        if outcome.remote:
            relay = f"{outcome.remote}:{outcome.port}" if outcome.port else outcome.remote
    dispatched = dispatched_at or now
    delays = (dispatched - arrival, now - dispatched - connect - transfer, connect, transfer)
    dsn = last.enhanced if last is not None and last.enhanced else ""
    extra = None
    if structured():
        fields: dict[str, Any] = {"queue_id": queue_id, "to": address, "status": status, "attempts": attempts,
                                  "relay": relay, "delay": round(max(now - arrival, 0.0), 3),
                                  "delays": [round(max(d, 0.0), 3) for d in delays], "dsn": dsn, "reply": reply,
                                  "code": last.code if last is not None else 0}
        if source:
            fields["source"] = source
        extra = {FIELDS: fields}
    shown = f"{relay}, source={source}" if source else relay
    writer = direct(log) if extra is None else None
    if writer is not None:
        tail = _tails.tail(shown, now - arrival, delays, dsn, status, reply)
        writer.write(log, f"{queue_id}: to=<{address}>, {tail}")
        return
    log.info("%s: to=<%s>, relay=%s, delay=%s, delays=%s/%s/%s/%s, dsn=%s, status=%s (%s)", queue_id, address, shown,
             seconds(now - arrival), *map(seconds, delays), dsn or "-", status, reply, extra=extra)
