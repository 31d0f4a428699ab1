"""The mtacluster command's error paths: one clear line and an exit code, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main


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


def test_missing_key_file_is_a_configuration_error_everywhere(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[bus]\ncurve_key_file = "{tmp_path / "missing"}"\n')
    for command in (["config", "check", str(config)], ["queue", "--config", str(config), "list"]):
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
    assert main(["queue", "--config", str(config), "--timeout", "0.2", "list"]) == 1
    captured = capsys.readouterr()
    assert "shard 0 (tcp://127.0.0.1:9) is unreachable (no connection within 0.2s)" in captured.err
    assert "queue is empty" not in captured.out  # an unreachable queue is not an empty one
