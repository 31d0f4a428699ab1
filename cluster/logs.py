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
"""

from __future__ import annotations

import datetime
import json
import logging
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


def text_formatter(role: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")


def configure(role: str, fmt: str = "text", level: str = "INFO") -> None:
    """Send every log record of this process at `level` or above to stderr in `fmt` ("text" or "json")."""
    global _structured
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (formats: {', '.join(FORMATS)})")
    _structured = fmt == "json"
    # Neither format names the calling function, file or line: skip the stack walk that finds them, the
    # largest part of a record's cost (the logging HOWTO's "Optimization" section; ~15 us per line here).
    logging._srcfile = None
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else text_formatter(role))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
