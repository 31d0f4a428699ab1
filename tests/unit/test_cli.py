"""The mtacluster command's error paths: one clear line and an exit code, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import CLOSED_PIPE_STATUS, build_parser, main
from cluster.cli.queue import Answers, _list
from cluster.version import VERSION
from tests.support import REPO
from tests.support.tooling import require_module


def test_config_check_ok_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[smtp]\nhostname = "mx.test"\n')
    assert main(["config", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\nretry_first = \"soon\"\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtacluster: configuration error: queue.retry_first:") and "Traceback" not in err
    grace = tmp_path / "grace.toml"
    grace.write_text('[smtp]\nshutdown_grace = "30s"\n')
    assert main(["config", "check", str(grace)]) == 0
    grace.write_text('[smtp]\nshutdown_grace = "-5s"\n')
    assert main(["config", "check", str(grace)]) == 2
    assert capsys.readouterr().err.startswith("mtacluster: configuration error: smtp.shutdown_grace:")


def test_missing_key_file_is_a_configuration_error_everywhere(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[bus]\ncurve_key_file = "{tmp_path / "missing"}"\n')
    for command in (["config", "check", str(config)], ["queue", "list", "--config", str(config)]):
        assert main(command) == 2
        assert "bus.curve_key_file" in capsys.readouterr().err


def test_keys_writes_a_key_pair_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cluster.keys"
    assert main(["keys", str(path)]) == 0
    assert "public key" in capsys.readouterr().out
    assert main(["keys", str(path)]) == 1  # never overwrites a key pair
    assert "File exists" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text(f'[bus]\ncurve_key_file = "{path}"\n[metrics]\nlisten = ""\n')
    assert main(["config", "check", str(config)]) == 0


def test_queue_command_with_no_shard_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[queue]\nshards = ["tcp://127.0.0.1:9"]\n')
    assert main(["queue", "list", "--config", str(config), "--timeout", "0.2"]) == 1
    captured = capsys.readouterr()
    assert "shard 0 (tcp://127.0.0.1:9) is unreachable (no connection within 0.2s)" in captured.err
    assert "queue is empty" not in captured.out  # an unreachable queue is not an empty one


def test_options_go_after_the_subcommand_and_before_it_still_works() -> None:
    parser = build_parser()
    after = parser.parse_args(["queue", "list", "--json", "--config", "c.toml", "--limit", "5", "--timeout", "2"])
    assert (after.json, after.config, after.limit, after.timeout) == (True, "c.toml", 5, 2.0)
    before = parser.parse_args(["queue", "--config", "c.toml", "--json", "hold", "Q1"])
    assert (before.json, before.config, before.queue_id) == (True, "c.toml", "Q1")
    defaults = parser.parse_args(["queue", "flush"])
    assert (defaults.json, defaults.config, defaults.domain) == (False, None, None)
    for argv in (["user", "list", "--config", "c.toml"], ["up", "--config", "c.toml"],
                 ["serve", "worker", "--config", "c.toml"], ["config", "check", "--config", "c.toml"]):
        assert parser.parse_args(argv).config == "c.toml", argv


@pytest.mark.parametrize("argv", [["queue", "list", "--limit", "0"], ["queue", "list", "--timeout", "-1"],
                                  ["queue", "list", "--limit", "many"]])
def test_bad_option_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "expected a positive" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"mtacluster {VERSION}\n"


@pytest.mark.parametrize(("argv", "status"), [(["config", "check"], CLOSED_PIPE_STATUS),
                                              (["--help"], 0)])  # argparse ignores write errors itself
def test_a_closed_pipe_is_no_traceback(argv: list[str], status: int) -> None:
    """`mtacluster ... | head`: the reader is gone before the command writes."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run([sys.executable, "-m", "cluster", *argv], stdout=writer, stderr=subprocess.PIPE,
                              cwd=REPO, timeout=60, check=False)
    finally:
        os.close(writer)
    assert done.stderr == b"" and done.returncode == status


def message(queue_id: str, arrival: float) -> dict[str, object]:
    return {"queue_id": queue_id, "sender": "a@b.test", "arrival": arrival, "size": 10,
            "recipients": [{"address": "r@d.test", "state": "ready", "attempts": 0}]}


def test_list_merges_shards_oldest_first_and_says_the_total(capsys: pytest.CaptureFixture[str]) -> None:
    answers = Answers(data=[(0, {"messages": [message("Q1", 1.0), message("Q3", 3.0)], "total": 40}),
                            (1, {"messages": [message("Q2", 2.0)], "total": 2})])
    _list(answers, 2, as_json=False)
    out = capsys.readouterr().out
    assert out.index("Q1") < out.index("Q2") and "Q3" not in out
    assert out.endswith("-- showing the oldest 2 of 42 messages on 2 shards; use --limit N to see more\n")
    _list(Answers(data=[(0, {"messages": [message("Q1", 1.0)], "total": 1})]), 10, as_json=False)
    assert capsys.readouterr().out.endswith("-- 1 message on 1 shard\n")
    _list(Answers(data=[(0, {"messages": [], "total": 0}), (1, [])]), 10, as_json=False)
    assert capsys.readouterr().out == "queue is empty\n"


def test_config_check_insists_on_tls_for_mailbox_nodes_off_loopback_and_names_deprecated_keys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    off_host = tmp_path / "off-host.toml"
    off_host.write_text('[mailbox]\nnodes = ["10.0.0.5:2424", "10.0.0.6:2424"]\n')
    assert main(["config", "check", str(off_host)]) == 2
    assert "mailbox.tls_cert_file: required: mailbox node 10.0.0.5:2424 is not on loopback" in capsys.readouterr().err
    old = tmp_path / "old.toml"
    old.write_text('[pop3]\nlisten = ["127.0.0.1:1110"]\n')
    assert main(["config", "check", str(old)]) == 0
    assert "warning: pop3.listen is deprecated; it is read as mailbox.pop3_listen" in capsys.readouterr().err


def test_config_check_names_the_submission_listeners_and_refuses_them_without_tls(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text('[smtp]\nsubmission_listen = ["127.0.0.1:5587"]\n')
    assert main(["config", "check", str(plain)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtacluster: configuration error: smtp.submission_listen: needs smtp.tls_cert_file")
    twice = tmp_path / "twice.toml"
    twice.write_text('[smtp]\nlisten = ["127.0.0.1:2525"]\nsubmissions_listen = ["127.0.0.1:2525"]\n')
    assert main(["config", "check", str(twice)]) == 2
    assert "smtp.submissions_listen: 127.0.0.1:2525 is also in smtp.listen" in capsys.readouterr().err
    certificate, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    trustme = require_module("trustme")
    issued = trustme.CA().issue_cert("mx.test")
    issued.private_key_pem.write_to_path(str(key))
    certificate.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    good = tmp_path / "good.toml"
    good.write_text(f'[smtp]\ntls_cert_file = "{certificate}"\ntls_key_file = "{key}"\n'
                    'submission_listen = ["127.0.0.1:5587"]\nsubmissions_listen = ["127.0.0.1:5465"]\n')
    assert main(["config", "check", str(good)]) == 0
    assert "listen 127.0.0.1:2525, submission 127.0.0.1:5587, submissions 127.0.0.1:5465" in capsys.readouterr().out


def test_list_shows_a_ready_recipient_of_a_held_off_destination_as_held_off(
        capsys: pytest.CaptureFixture[str]) -> None:
    held = message("Q1", 1.0)
    held["recipients"] = [{"address": "r@down.test", "state": "ready", "attempts": 3,
                           "held_off_until": 1_700_000_000.0}]
    _list(Answers(data=[(0, {"messages": [held], "total": 1})]), 10, as_json=False)
    assert "held_off  r@down.test  attempts=3 until=2023-11-14 22:13:20" in capsys.readouterr().out
