"""The mailbox role's POP3 decisions without sockets: who may log in without TLS, user -> Maildir, locks, UIDL."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, MailboxConfig, config_from_dict
from cluster.mailbox.maildir import MaildirStore
from cluster.mailbox.ownership import login_localpart as mailbox_localpart
from cluster.mailbox.pop3 import (
    Maildrop,
    MaildropLocked,
    message_size,
    plaintext_login_allowed,
    uid_for,
)
from cluster.mailbox.pop3_protocol import normalize_message
from cluster.tls import server_context


@pytest.mark.parametrize(("address", "allowed"), [
    ("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.0.2.1", False), ("2001:db8::1", False), ("::ffff:192.0.2.1", False),
    ("unknown", False), ("", False),
])
def test_plaintext_login_only_from_loopback(address: str, allowed: bool) -> None:
    assert plaintext_login_allowed(address) is allowed


def test_user_name_to_local_part() -> None:
    assert mailbox_localpart("alice@example.org") == "alice"
    assert mailbox_localpart("alice") == "alice"
    assert mailbox_localpart('"odd@name"@example.org') == '"odd@name"'


def test_uid_is_the_maildir_base_name_or_a_digest() -> None:
    assert uid_for("1700000000.M1P2Q3.host:2,S") == "1700000000.M1P2Q3.host"
    long_name = "x" * 71
    assert uid_for(long_name).startswith("sha1-") and len(uid_for(long_name)) <= 70
    assert uid_for("with space").startswith("sha1-")


def test_message_size_counts_crlf_as_sent(tmp_path: Path) -> None:
    for content in (b"a\r\nb\r\n", b"a\nb\n", b"a\rb", b"no end", b"", b"mixed\r\nbare\nlast"):
        path = tmp_path / "m"
        path.write_bytes(content)
        assert message_size(path) == len(normalize_message(content)), content


def deliver(root: Path, localpart: str, body: bytes) -> Path:
    return MaildirStore(root, "host.test").deliver(localpart, "sender@example.net", body)


def test_open_moves_new_to_cur_lists_in_order_and_locks(tmp_path: Path) -> None:
    first = deliver(tmp_path, "alice", b"Subject: 1\r\n\r\none\r\n")
    second = deliver(tmp_path, "alice", b"Subject: 2\r\n\r\ntwo\r\n")
    box = tmp_path / "alice"
    drop = Maildrop.open(box)
    try:
        assert list((box / "new").iterdir()) == []
        assert sorted(p.name for p in (box / "cur").iterdir()) == sorted([f"{first.name}:2,", f"{second.name}:2,"])
        assert [m.uid for m in drop.infos] == [first.name, second.name]
        assert drop.read(first.name) == (box / "cur" / f"{first.name}:2,").read_bytes()
        with pytest.raises(MaildropLocked):
            Maildrop.open(box)
        assert drop.remove((first.name,)) == 0
        assert drop.remove((first.name,)) == 0  # already gone counts as removed
        assert [p.name for p in (box / "cur").iterdir()] == [f"{second.name}:2,"]
    finally:
        drop.close()
    again = Maildrop.open(box)  # the lock went with close()
    assert [m.uid for m in again.infos] == [second.name]
    again.close()


def test_read_content_and_size(tmp_path: Path) -> None:
    body = b"Subject: x\r\n\r\nhello\r\n"
    path = deliver(tmp_path, "bob", body)
    drop = Maildrop.open(tmp_path / "bob")
    try:
        content = drop.read(path.name)
        assert content == b"Return-Path: <sender@example.net>\r\n" + body
        assert drop.infos[0].size == len(content)
        assert drop.read("no-such-uid") is None
    finally:
        drop.close()


def test_open_of_an_empty_mailbox_creates_it(tmp_path: Path) -> None:
    drop = Maildrop.open(tmp_path / "carol")
    assert drop.infos == [] and (tmp_path / "carol" / "cur").is_dir()
    drop.close()


def test_mailbox_config_defaults_and_bounds() -> None:
    config = config_from_dict({}, environ={})
    assert config.mailbox == MailboxConfig()
    m = config.mailbox
    assert m.pop3_listen == ("127.0.0.1:1110",) and float(m.idle_timeout) == 600.0 and config.up.mailbox
    assert m.nodes == m.lmtp_listen == ("127.0.0.1:2424",) and m.pop3s_listen == () and m.quota == 0
    for raw, key in (({"idle_timeout": "5m"}, "mailbox.idle_timeout"),
                     ({"tls_cert_file": "/x.pem"}, "mailbox.tls_key_file"),
                     ({"pop3_listen": ["nonsense"]}, "mailbox.pop3_listen"),
                     ({"lmtp_listen": ["nonsense"]}, "mailbox.lmtp_listen"),
                     ({"nodes": []}, "mailbox.nodes"),
                     ({"nodes": ["a:24", "A:24"]}, "mailbox.nodes"),
                     ({"max_auth_failures": 0}, "mailbox.max_auth_failures"),
                     ({"max_connections": 0}, "mailbox.max_connections"),
                     ({"quota": "lots"}, "mailbox.quota"),
                     ({"pop3s_listen": ["127.0.0.1:995"]}, "mailbox.tls_cert_file")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({"mailbox": raw}, environ={})
    with pytest.raises(ConfigError, match=r"up.mailbox"):
        config_from_dict({"up": {"mailbox": "yes"}}, environ={})


def test_mailbox_nodes_off_loopback_need_tls() -> None:
    """ARCHITECTURE.md contract 5: LMTP and proxied POP3 that leave the host are encrypted."""
    with pytest.raises(ConfigError, match=r"mailbox\.tls_cert_file: required: mailbox node 10\.0\.0\.7:24"):
        config_from_dict({"mailbox": {"nodes": ["127.0.0.1:24", "10.0.0.7:24"]}}, environ={})
    config = config_from_dict({"mailbox": {"nodes": ["10.0.0.6:24", "10.0.0.7:24"], "tls_cert_file": "/c.pem",
                                           "tls_key_file": "/k.pem"}}, environ={})
    assert len(config.mailbox.nodes) == 2


def test_old_pop3_section_still_loads_with_a_deprecation_note() -> None:
    config = config_from_dict({"pop3": {"listen": ["127.0.0.1:1999"], "max_errors": 4},
                               "delivery": {"maildir_root": "/srv/mail"}, "up": {"pop3": False}}, environ={})
    assert config.mailbox.pop3_listen == ("127.0.0.1:1999",) and config.mailbox.max_errors == 4
    assert config.mailbox.maildir_root == "/srv/mail" and not config.up.mailbox
    assert "pop3.listen is deprecated; it is read as mailbox.pop3_listen (rename it)" in config.deprecations
    assert len(config.deprecations) == 4
    # The new name wins when both are given.
    both = config_from_dict({"pop3": {"listen": ["127.0.0.1:1"]}, "mailbox": {"pop3_listen": ["127.0.0.1:2"]}},
                            environ={})
    assert both.mailbox.pop3_listen == ("127.0.0.1:2",)
    with pytest.raises(ConfigError, match=r"pop3\.nonsense: unknown key"):
        config_from_dict({"pop3": {"nonsense": 1}}, environ={})
    assert config_from_dict({}, environ={}).deprecations == ()


def test_tls_context_errors_name_the_key(tmp_path: Path) -> None:
    assert server_context("", "", "pop3") is None
    with pytest.raises(ConfigError, match=r"pop3.tls_cert_file"):
        server_context(str(tmp_path / "missing.pem"), str(tmp_path / "k.pem"), "pop3")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"pop3.tls_key_file"):
        server_context(str(tmp_path / "bad.pem"), str(tmp_path / "bad.pem"), "pop3")
