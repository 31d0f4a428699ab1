"""Log output of every role: the text and JSON formats, and the `[log] format` key."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import logs
from cluster.bus.schemas import Outcome, OutcomeKind
from cluster.cli import main
from cluster.config import ConfigError, config_from_dict
from cluster.queue import maillog
from cluster.queue.records import LastOutcome


@pytest.fixture
def root_handlers() -> Iterator[None]:
    """`logs.configure` replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_json_lines_carry_the_event_fields(root_handlers: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("queue", "json")
    logging.getLogger("mtacluster.queue").info(
        "%s: to=<%s>, status=%s", "0A1B", "bob@example.net", "sent",
        extra={logs.FIELDS: {"queue_id": "0A1B", "to": "bob@example.net", "status": "sent", "delays": [0, 0.5],
                             "message": "not allowed to replace the message"}})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("mtacluster.worker").exception("delivery failed")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["message"] == "0A1B: to=<bob@example.net>, status=sent"
    assert (first["level"], first["role"], first["logger"]) == ("INFO", "queue", "mtacluster.queue")
    assert (first["queue_id"], first["to"], first["status"], first["delays"]) == ("0A1B", "bob@example.net", "sent",
                                                                                  [0, 0.5])
    assert first["time"].endswith("Z") and isinstance(first["pid"], int)
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exception"]


def test_text_lines_name_role_and_pid(root_handlers: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("worker", "text", "warning")
    logging.getLogger("mtacluster.queue").info("not at this level")
    logging.getLogger("mtacluster.queue").warning("hello %s", "there")
    line = capsys.readouterr().err.strip()
    assert " worker[" in line and line.endswith("WARNING mtacluster.queue: hello there")


def test_the_text_line_is_the_standard_formatters_line() -> None:
    """TextFormatter makes the line with less work (time once per second): the same text, to the millisecond."""
    standard = logging.Formatter("%(asctime)s queue[%(process)d] %(levelname)s %(name)s: %(message)s")
    fast = logs.TextFormatter("queue")
    for created in (1764464401.0, 1764464401.0005, 1764464401.9996, 1764464402.25, 1764464459.123, 1764464401.5):
        record = logging.LogRecord("mtacluster.queue", logging.INFO, __file__, 1, "%s: to=<%s>", ("0A1B", "b@c.d"),
                                   None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert fast.format(record) == standard.format(record)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("mtacluster.queue", logging.ERROR, __file__, 1, "failed %d", (3,), sys.exc_info())
    line = fast.format(record)
    assert line == standard.format(record) and "RuntimeError: boom" in line


def test_the_format_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert config_from_dict({"log": {"format": "json"}}, environ={}).log.format == "json"
    assert config_from_dict({}, environ={"MTACLUSTER_LOG_FORMAT": "json"}).log.format == "json"
    with pytest.raises(ConfigError, match=r'log\.format: expected "text" or "json"'):
        config_from_dict({"log": {"format": "xml"}}, environ={})
    assert config_from_dict({}, environ={"MTACLUSTER_LOG_LEVEL": "debug"}).log.level == "debug"
    with pytest.raises(ConfigError, match=r"log\.level"):
        config_from_dict({"log": {"level": "chatty"}}, environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text('[log]\nformat = "syslog"\n')
    assert main(["config", "check", str(bad)]) == 2
    assert "log.format" in capsys.readouterr().err


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<rest>.*)$")


def test_direct_lines_are_the_text_formatters_lines(root_handlers: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("queue", "text")
    logger = logging.getLogger("mtacluster.queue")
    writer = logs.direct(logger)
    assert writer is not None
    message = "0A1B: to=<bob@example.net>, relay=none, status=deferred (451 4.3.0 100% full)"
    writer.write(logger, message)
    logger.info("%s", message)
    direct_line, logged_line = capsys.readouterr().err.splitlines()
    direct_match, logged_match = TEXT_LINE.match(direct_line), TEXT_LINE.match(logged_line)
    assert direct_match is not None and logged_match is not None
    assert direct_match["rest"] == logged_match["rest"] == f"queue[{os.getpid()}] INFO mtacluster.queue: {message}"
    assert direct_line[:16] == logged_line[:16]  # the same minute (both are now)


def test_direct_steps_aside_when_others_could_see_the_record(root_handlers: None) -> None:
    logger = logging.getLogger("mtacluster.queue")
    logs.configure("queue", "text")
    assert logs.direct(logger) is not None
    extra = logging.NullHandler()
    logging.getLogger().addHandler(extra)  # as pytest's caplog: the record must reach it too
    assert logs.direct(logger) is None
    logging.getLogger().removeHandler(extra)
    assert logs.direct(logger) is not None
    logger.addFilter(lambda record: False)
    try:
        assert logs.direct(logger) is None
    finally:
        logger.filters.clear()
    logs.configure("queue", "text", "warning")
    assert logs.direct(logger) is None
    logs.configure("queue", "json")
    assert logs.direct(logger) is None


def test_the_delivery_log_line_is_the_same_either_way(root_handlers: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("queue", "text")
    assert logs.direct(maillog.log) is not None
    outcome = Outcome("x@a.test", OutcomeKind.DELIVERED, 250, "2.0.0", "Ok: queued as 4F2A", "mx.a.test[192.0.2.7]",
                      25, 0.5, 1.25)
    last = LastOutcome.of(outcome)

    def line() -> str:
        maillog.record("0A1B", "x@a.test", "sent", last, 1, 100.0, 102.0, 100.0, outcome, "blue")
        (text,) = capsys.readouterr().err.splitlines()
        match = TEXT_LINE.match(text)
        assert match is not None
        return match["rest"]

    direct_line = line()
    extra = logging.NullHandler()
    logging.getLogger().addHandler(extra)  # the logging module's own way now
    assert logs.direct(maillog.log) is None
    assert line() == direct_line == (
        f"queue[{os.getpid()}] INFO mtacluster.queue: 0A1B: to=<x@a.test>, relay=mx.a.test[192.0.2.7]:25, "
        "source=blue, delay=2, delays=0/0.25/0.5/1.25, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4F2A)")


def test_delivery_lines_of_recipients_sharing_an_outcome_each_get_their_own_facts(
        root_handlers: None, capsys: pytest.CaptureFixture[str]) -> None:
    """The text after the address is built once for recipients sharing relay, delays, DSN, status and reply;
    a recipient whose outcome differs in any of them gets its own."""
    logs.configure("queue", "text")
    assert logs.direct(maillog.log) is not None
    sent = Outcome("x@a.test", OutcomeKind.DELIVERED, 250, "2.0.0", "Ok", "mx.a.test[192.0.2.7]", 25, 0.5, 1.25)
    refused = Outcome("z@a.test", OutcomeKind.FAILED, 550, "5.1.1", "No such user", "mx.a.test[192.0.2.7]", 25,
                      0.5, 1.25)
    maillog.record("0A1B", "x@a.test", "sent", LastOutcome.of(sent), 1, 100.0, 102.0, 100.0, sent)
    maillog.record("0A1B", "y@a.test", "sent", LastOutcome.of(sent), 1, 100.0, 102.0, 100.0, sent)
    maillog.record("0A1B", "z@a.test", "bounced", LastOutcome.of(refused), 1, 100.0, 102.0, 100.0, refused)
    maillog.record("0A1B", "w@a.test", "sent", LastOutcome.of(sent), 1, 100.0, 103.0, 100.0, sent)
    lines = [line.partition("mtacluster.queue: ")[2] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "0A1B: to=<x@a.test>, relay=mx.a.test[192.0.2.7]:25, delay=2, delays=0/0.25/0.5/1.25, dsn=2.0.0, "
        "status=sent (250 2.0.0 Ok)",
        "0A1B: to=<y@a.test>, relay=mx.a.test[192.0.2.7]:25, delay=2, delays=0/0.25/0.5/1.25, dsn=2.0.0, "
        "status=sent (250 2.0.0 Ok)",
        "0A1B: to=<z@a.test>, relay=mx.a.test[192.0.2.7]:25, delay=2, delays=0/0.25/0.5/1.25, dsn=5.1.1, "
        "status=bounced (550 5.1.1 No such user)",
        "0A1B: to=<w@a.test>, relay=mx.a.test[192.0.2.7]:25, delay=3, delays=0/1.25/0.5/1.25, dsn=2.0.0, "
        "status=sent (250 2.0.0 Ok)"]


@pytest.mark.parametrize(("value", "text"), [(0.0, "0"), (-1.0, "0"), (0.001, "0"), (0.004, "0"), (0.006, "0.01"),
                                              (0.1, "0.1"), (0.25, "0.25"), (1.0, "1"), (1.999, "2"), (12.34, "12.34"),
                                              (99.999, "100"), (100.0, "100"), (3602.4, "3602")])
def test_delay_seconds_are_written_postfixs_way(value: float, text: str) -> None:
    assert maillog.seconds(value) == text


def test_delay_texts_are_remembered_within_bounds() -> None:
    values = [i / 1000 for i in range(maillog.SECONDS_KEPT + 10)]
    first = [maillog.seconds(v) for v in values]
    assert len(maillog._seconds_text) <= maillog.SECONDS_KEPT
    assert [maillog.seconds(v) for v in values] == first
    assert first[:3] == ["0", "0", "0"] and first[10] == "0.01" and first[1500] == "1.5"


class _Stream:
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        return None


def _direct_writer_to(stream: _Stream) -> tuple[logging.Logger, logs.DirectText]:
    """The queue role's text logging, its direct writer writing to `stream`."""
    logs.configure("queue", "text")
    logger = logging.getLogger("mtacluster.queue")
    writer = logs.direct(logger)
    assert writer is not None
    writer.handler.setStream(stream)  # type: ignore[arg-type]
    return logger, writer


async def test_direct_lines_of_one_turn_go_out_in_one_write_and_in_order(root_handlers: None) -> None:
    stream = _Stream()
    logger, writer = _direct_writer_to(stream)
    writer.write(logger, "first")
    writer.write(logger, "second")
    assert stream.writes == []  # gathered until the end of this turn of the loop
    logger.warning("the usual way")  # writes what was gathered first
    writer.write(logger, "third")
    writer.write(logger, "fourth")
    await asyncio.sleep(0)
    assert len(stream.writes) == 3 and stream.writes[0].count("\n") == 2 and stream.writes[2].count("\n") == 2
    lines = "".join(stream.writes).splitlines()
    assert [line.rpartition(": ")[2] for line in lines] == ["first", "second", "the usual way", "third", "fourth"]
    assert all(TEXT_LINE.match(line) for line in lines)
    assert lines[0].split(" INFO ")[0] == lines[1].split(" INFO ")[0]  # one time stamp for one write
    writer.write(logger, "at exit")
    writer.handler.flush()  # as logging.shutdown does at exit: nothing gathered is lost
    assert stream.writes[-1].endswith("INFO mtacluster.queue: at exit\n")


class _FailingOnce(_Stream):
    """A stream whose first write gets half its text out, then fails (a full disk, say)."""

    def write(self, text: str) -> int:
        if not self.writes:
            self.writes.append(text[: len(text) // 2])
            raise OSError(28, "No space left on device")
        return super().write(text)


async def test_a_failed_write_is_reported_once_and_no_line_is_written_twice(
        root_handlers: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Part of a failed write may be in the log already: its lines are not logged again (each outcome at most
    once), and the failure is reported once, as the logging module reports a record it could not write."""
    stream = _FailingOnce()
    logger, writer = _direct_writer_to(stream)
    for name in ("Q1", "Q2", "Q3", "Q4"):
        writer.write(logger, f"{name}: status=sent")
    writer.flush()
    writer.write(logger, "Q5: status=sent")
    writer.flush()
    logger.info("Q6: the usual way")
    written = "".join(stream.writes)
    assert all(written.count(f"Q{n}: ") <= 1 for n in range(1, 7)), written
    assert "Q1: status=sent" in written and "Q5: status=sent" in written and "Q6: the usual way" in written
    report = capsys.readouterr().err
    assert report.count("--- Logging error ---") == 1 and "4 log lines not written, or in part" in report
