"""Log output of every role: the text and JSON formats, and the `[log] format` key."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import logs
from cluster.cli import main
from cluster.config import ConfigError, config_from_dict


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
