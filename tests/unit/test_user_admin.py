"""`mtacluster user add|remove|list` and `config check` of the files a configuration names (TLS, users)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.users import UserDatabase


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
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))
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
    assert "must not be empty" in err and "not a valid user name" in err and "No such file" in err


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
