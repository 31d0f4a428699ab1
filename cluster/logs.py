"""Logging for every role: one line per event, as text (the default) or as JSON for log pipelines.

`configure(role, fmt)` installs one handler on the root logger writing to stderr:
- "text": `2026-11-29 20:10:01,123 queue[4242] INFO mtacluster.queue: 0A1B2C3D4E5F6G00: to=<a@b.test>, ...`
- "json": one object per line, `{"time": "2026-11-29T20:10:01.123Z", "level": "INFO", "role": "queue",
  "pid": 4242, "logger": "mtacluster.queue", "message": "...", ...}` plus the event's own fields when the
  caller gives them as `extra={"fields": {...}}` (the delivery log's queue_id, to, relay, delays, dsn, status),
  and "exception" with the traceback when there is one. Loki or Elasticsearch index the fields as they are.
The format and level come from `[log] format` and `[log] level` in the configuration (cluster/config.py;
MTACLUSTER_LOG_LEVEL=DEBUG in the environment overrides the level, as for every key). No failure modes: a
field that JSON cannot encode is written as its repr.

`direct(logger)`: lines logged in bulk (the shard's delivery log, one line per recipient outcome) can skip the
logging module's record, formatter and handler chain when all they would do is write the text format to the
installed handler: it gives a writer of already formatted INFO lines, byte for byte the line the formatter
would write, or None when anything else could see the record (another handler, e.g. pytest's; a filter; the
JSON format; INFO off), and the caller then logs as usual. Lines are gathered and written with one write
(100 lines for a 100-recipient Result: one system call, one time stamp, that of the first line) when the
caller calls `flush()`: at the moment the outcomes they tell of are durable or acknowledged (the shard once
the commit holding them has returned, and right after its Stored answers; the frontend before its 250), so a
kill -9 loses no line of an outcome already made durable, except in the few statements between the commit's
return and the flush. Lines nobody flushes are written at the end of the loop turn; a record logged the usual
way meanwhile, from any thread, writes the gathered lines first, so the order of lines is kept. Without a
running loop each line is written at once. A write that fails is reported once by the logging module
(`Handler.handleError`, as for a record) and its lines are not written again: part of them may be in the log
already, and an outcome must not appear twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import time
from typing import Any

FORMATS = ("text", "json")
FIELDS = "fields"

_structured = False


def structured() -> bool:
    """True when log lines are JSON, so callers build their `fields` only when someone reads them."""
    return _structured


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "level": record.levelname, "role": self.role, "pid": record.process, "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=repr)


class TextFormatter(logging.Formatter):
    """The text line: what `logging.Formatter` makes of TEXT_FORMAT, made with less work per line (the queue
    shard writes three lines per message): the date and time are formatted once per second, and the line is
    one f-string instead of the formatter's `%`-style map. A record with a traceback or stack goes the
    standard way."""

    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")
        self.role = role
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        return (f"{self.asctime(record.created)} {self.role}[{record.process}] {record.levelname} {record.name}: "
                f"{message}")

    def asctime(self, created: float) -> str:
        """The formatter's %(asctime)s of a record made at `created`: strftime once per second, then ",msecs"."""
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(self.default_time_format, self.converter(second))
        return f"{self._stamp},{int((created - second) * 1000):03d}"


class DirectText:
    """Writes INFO lines of the text format straight to the handler `configure` installed (module docstring)."""

    def __init__(self, handler: logging.StreamHandler[Any], formatter: TextFormatter) -> None:
        self.handler = handler
        self.formatter = formatter
        # Lines of this turn not written yet (logger name and message), and when the first of them came.
        self._pending: list[str] = []
        self._since = 0.0

    def takes(self, logger: logging.Logger) -> bool:
        """True when an INFO record of `logger` would reach only this handler, unfiltered (checked per line:
        a handler added later, as pytest's caplog does, turns the direct way off at once)."""
        root = logging.root
        handler = self.handler
        handlers = root.handlers
        if (len(handlers) != 1 or handlers[0] is not handler or handler.filters or handler.level > logging.INFO
                or logger.filters or not logger.isEnabledFor(logging.INFO)):
            return False
        node: logging.Logger | None = logger
        while node is not None and node is not root:  # the loggers the record passes on its way to the root
            if node.handlers or not node.propagate:
                return False
            node = node.parent
        return node is root

    def write(self, logger: logging.Logger, message: str) -> None:
        """`logger.info("%s", message)` as the text formatter writes it: "asctime role[pid] INFO name: message",
        written at the end of this turn of the event loop (at once without one)."""
        with self.handler.lock or contextlib.nullcontext():
            pending = self._pending
            pending.append(f"{logger.name}: {message}\n")
            if len(pending) > 1:
                return
            self._since = time.time()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines gathered so far, if any, in one write (they carry the time of the first)."""
        with self.handler.lock or contextlib.nullcontext():
            if not self._pending:
                return
            lines, self._pending = self._pending, []
            formatter = self.formatter
            prefix = f"{formatter.asctime(self._since)} {formatter.role}[{os.getpid()}] INFO "
            stream = self.handler.stream
            try:
                stream.write(prefix + prefix.join(lines) if len(lines) > 1 else prefix + lines[0])
                stream.flush()
            except Exception:  # as StreamHandler.emit: the logging module reports it (logging.raiseExceptions)
                self.handler.handleError(logging.LogRecord(
                    __name__, logging.ERROR, __file__, 0, f"{len(lines)} log lines not written, or in part", None,
                    None))


class TextHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` installs: before it writes a record, the direct lines gathered so far go out, so
    lines keep their order whichever way they were logged."""

    direct: DirectText | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.direct is not None:
            self.direct.flush()
        super().emit(record)

    def flush(self) -> None:
        if self.direct is not None:
            self.direct.flush()
        super().flush()


_direct: DirectText | None = None


def flush_direct() -> None:
    """Write the direct lines gathered so far now (module docstring: when an outcome is durable or answered)."""
    writer = _direct
    if writer is not None:
        writer.flush()


def direct(logger: logging.Logger) -> DirectText | None:
    """The direct writer for INFO lines of `logger`, or None: log them the usual way (module docstring)."""
    writer = _direct
    return writer if writer is not None and writer.takes(logger) else None


def configure(role: str, fmt: str = "text", level: str = "INFO") -> None:
    """Send every log record of this process at `level` or above to stderr in `fmt` ("text" or "json")."""
    global _structured, _direct
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (formats: {', '.join(FORMATS)})")
    _structured = fmt == "json"
    # Neither format names the calling function, file or line: skip the stack walk that finds them, the
    # largest part of a record's cost (the logging HOWTO's "Optimization" section; ~15 us per line here).
    logging._srcfile = None
    # Nor the thread or the multiprocessing process name: two more look-ups per record that no line shows.
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = TextHandler()
    text = TextFormatter(role)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else text)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if _direct is not None:
        _direct.flush()  # lines of the handler this one replaces
    _direct = handler.direct = None if _structured else DirectText(handler, text)
