"""`mtacluster user add|remove|list` and `config check` of the files a configuration names (TLS, users)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.users import UserDatabase, add_user
from tests.support.tooling import free_port


def config_file(tmp_path: Path, **sections: dict[str, str]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f'{key} = "{value}"' for key, value in values.items())
    path = tmp_path / "mtacluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_add_list_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    config = config_file(tmp_path, auth={"users_file": str(users)})
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))  # 11 characters: long enough
    assert main(["user", "add", "alice@example.org", "--password-stdin", "--config", config]) == 0
    assert UserDatabase(str(users)).verify("alice@example.org", "s3cret pass")
    assert users.stat().st_mode & 0o777 == 0o600
    assert main(["user", "--config", config, "list"]) == 0
    assert main(["user", "remove", "alice@example.org", "--config", config]) == 0
    assert main(["user", "list", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "alice@example.org\n" in out and "s3cret" not in out
    assert UserDatabase(str(users)).names() == []


def test_prompted_passwords_must_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_file(tmp_path, auth={"users_file": str(tmp_path / "users")})
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert main(["user", "add", "bob", "--config", config]) == 1
    assert not (tmp_path / "users").exists()


def test_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["user", "list", "--config", config_file(tmp_path, smtp={"hostname": "mx.test"})]) == 1
    assert "auth.users_file is not set" in capsys.readouterr().err
    config = config_file(tmp_path, auth={"users_file": str(tmp_path / "users")})
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["user", "add", "bob", "--password-stdin", "--config", config]) == 1
    assert main(["user", "add", "bad name", "--password-stdin", "--config", config]) == 1
    assert main(["user", "remove", "nobody", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "must not be empty" in err and "not a valid user name" in err and "no user 'nobody'" in err


@pytest.mark.parametrize(
    ("smtp", "auth", "key"),
    [({"tls_cert_file": "/nonexistent/tls.crt", "tls_key_file": "/nonexistent/tls.key"}, {}, "smtp.tls_cert_file"),
     ({"tls_cert_file": "/nonexistent/tls.crt"}, {}, "smtp.tls_key_file"),
     ({}, {"users_file": "/nonexistent/users"}, "auth.users_file")],
)
def test_config_check_refuses_missing_or_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          smtp: dict[str, str], auth: dict[str, str],
                                                          key: str) -> None:
    assert main(["config", "check", config_file(tmp_path, smtp=smtp, auth=auth)]) == 2
    assert f"configuration error: {key}:" in capsys.readouterr().err


def test_config_check_refuses_a_key_that_does_not_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("not a certificate\n")
    assert main(["config", "check", config_file(tmp_path, smtp={"tls_cert_file": str(not_pem),
                                                                "tls_key_file": str(not_pem)})]) == 2
    assert "configuration error: smtp.tls_key_file:" in capsys.readouterr().err


def test_add_with_addresses_and_limits_disable_enable_list_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    config = config_file(tmp_path, auth={"users_file": str(users)})
    monkeypatch.setattr("sys.stdin", io.StringIO("long enough pass\n"))
    assert main(["user", "add", "carol@example.org", "--password-stdin", "--address", "@example.net",
                 "--address", "c@example.com", "--messages-per-day", "7", "--recipients-per-day", "0",
                 "--config", config]) == 0
    assert main(["user", "disable", "carol@example.org", "--config", config]) == 0
    assert not UserDatabase(str(users)).verify("carol@example.org", "long enough pass")
    capsys.readouterr()
    assert main(["user", "list", "--json", "--config", config]) == 0
    [carol] = json.loads(capsys.readouterr().out)
    assert carol == {"name": "carol@example.org", "state": "disabled",
                     "addresses": ["carol@example.org", "@example.net", "c@example.com"],
                     "messages_per_day": 7, "recipients_per_day": 0, "mailbox_quota": None}
    assert main(["user", "enable", "carol@example.org", "--config", config]) == 0
    assert UserDatabase(str(users)).verify("carol@example.org", "long enough pass")
    assert main(["user", "enable", "nobody", "--config", config]) == 1


def test_add_refuses_short_passwords_and_bad_addresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, auth={"users_file": str(tmp_path / "users")})
    monkeypatch.setattr("sys.stdin", io.StringIO("seven77\n"))
    assert main(["user", "add", "dave", "--password-stdin", "--config", config]) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("long enough pass\n"))
    assert main(["user", "add", "dave", "--password-stdin", "--address", "not an address", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "at least 8 characters" in err and "--address 'not an address'" in err
    assert not (tmp_path / "users").exists()


def test_show_prints_the_account_and_reports_an_unreachable_shard(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    add_user(str(users), "erin@example.org", "long enough pass", messages_per_day=5)
    path = tmp_path / "mtacluster.toml"
    path.write_text(f'[auth]\nusers_file = "{users}"\n[queue]\nshards = ["tcp://127.0.0.1:{free_port()}"]\n')
    assert main(["user", "show", "erin@example.org", "--timeout", "0.2", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert "state:       active" in captured.out and "5 messages" in captured.out
    assert "usage unknown" in captured.err
    assert main(["user", "show", "nobody", "--config", str(path)]) == 1


def test_config_check_refuses_a_malformed_users_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    users.write_text('[users."alice"]\npassword = "scrypt$1$2$3$4$5"\nmessages_per_day = "many"\n')
    assert main(["config", "check", config_file(tmp_path, auth={"users_file": str(users)})]) == 2
    assert "configuration error: auth.users_file:" in capsys.readouterr().err
