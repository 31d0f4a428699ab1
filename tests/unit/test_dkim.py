"""DKIM signing: canonicalization (RFC 6376 3.4), header selection, signatures checked by dkimpy, keys, config."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.cli import main
from cluster.config import ConfigError, config_from_dict
from cluster.dkim.canon import body_hash, relaxed_body, relaxed_header, select_headers, split_message
from cluster.dkim.keys import dns_record, generate, load_private_key, txt_strings, write_private_key
from cluster.dkim.signer import DkimSigner, SigningKey

MESSAGE = (b"Received: from x\r\nFrom: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
           b"Subject:  a   folded\r\n\tsubject  \r\nDate: Sun, 29 Nov 2026 19:00:00 +0000\r\n"
           b"Message-ID: <1@example.org>\r\nX-Unsigned: yes\r\n\r\nHello  \t world \r\n\r\nbye\r\n\r\n\r\n")


def test_relaxed_canonicalization_follows_rfc6376_example() -> None:
    # RFC 6376 3.4.5: the example message and its relaxed canonical forms.
    fields, body = split_message(b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n")
    assert [relaxed_header(f) for f in fields] == [b"a:X\r\n", b"b:Y Z\r\n"]
    assert relaxed_body(body) == b" C\r\nD E\r\n"


def test_relaxed_body_edge_cases() -> None:
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n") == b""
    assert relaxed_body(b"no final newline  ") == b"no final newline\r\n"
    assert relaxed_body(b"a\r\n \t\r\n") == b"a\r\n"


def reference_relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 read literally, line by line (slow and plain: the yardstick for the fast version)."""
    lines = body.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()  # the CRLF that ends the last line
    out = []
    for line in lines:
        while b"  " in line or b"\t" in line:
            line = line.replace(b"\t", b" ").replace(b"  ", b" ")
        out.append(line.rstrip(b" "))
    while out and out[-1] == b"":
        out.pop()
    return b"".join(line + b"\r\n" for line in out)


# Bodies made of the pieces that matter: spaces, tabs, CRLFs, bare CR and LF, and text.
BODY_PIECES = st.lists(st.sampled_from([b" ", b"\t", b"\r\n", b"\r", b"\n", b"x", b"yz", b"  \t "]), max_size=40)


@settings(max_examples=200, deadline=None)
@given(BODY_PIECES)
def test_relaxed_body_and_its_hash_match_the_rfc_read_line_by_line(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    expected = reference_relaxed_body(body)
    assert relaxed_body(body) == expected
    assert body_hash(body) == hashlib.sha256(expected).digest()


def test_a_body_without_whitespace_is_hashed_without_a_copy() -> None:
    body = b"1XXXX\r\n2XXXX\r\n\r\n\r\n"
    assert relaxed_body(body) == b"1XXXX\r\n2XXXX\r\n"
    assert body_hash(body) == hashlib.sha256(b"1XXXX\r\n2XXXX\r\n").digest()
    assert relaxed_body(b"tail without CRLF ") == b"tail without CRLF\r\n"
    assert relaxed_body(b"a\r\n \t") == b"a\r\n"


HEADER_VALUES = st.lists(st.sampled_from([" ", "\t", "\r\n ", "\r\n\t", "v", "w x", ":"]), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["To", "SUBJECT", "Cc", "X-Other", "Date"]), HEADER_VALUES), max_size=6),
       BODY_PIECES)
def test_dkimpy_verifies_signatures_over_odd_whitespace(headers: list[tuple[str, list[str]]],
                                                        pieces: list[bytes]) -> None:
    head = "".join(f"{name}:{''.join(value).rstrip(chr(13) + chr(10) + ' ' + chr(9))}\r\n" for name, value in headers)
    # As the frontend stores it: CRLF line ends, the last line ended too.
    body = b"".join(pieces).replace(b"\r", b"").replace(b"\n", b"\r\n")
    message = f"From: a@example.org\r\n{head}\r\n".encode() + body + (b"" if body.endswith(b"\n") else b"\r\n")
    signing = ED25519_SIGNER.sign(message)
    assert signing.result == "signed"
    assert dkim.verify(signing.header + message, dnsfunc=lambda name, timeout=5: ED25519_RECORD)


def test_every_instance_is_signed_bottom_up_and_from_is_oversigned() -> None:
    fields, _ = split_message(b"To: a@x\r\nFrom: f@x\r\nTo: b@x\r\nSubject: s\r\n\r\n")
    listed, covered = select_headers(fields, ["from", "to", "cc"])
    assert listed == ["from", "from", "to", "to"]
    assert covered == [b"From: f@x", b"To: b@x", b"To: a@x"]


def _signer(algorithm: str = "rsa-sha256", name: str = "example.org", domain: str = "example.org"
            ) -> tuple[DkimSigner, bytes]:
    key = generate(algorithm, 1024 if algorithm == "rsa-sha256" else 0)
    signer = DkimSigner({name: SigningKey(domain, "s1", algorithm, key)},
                        config_from_dict({}, environ={}).dkim.sign_headers, clock=lambda: 1_790_000_000)
    return signer, dns_record(key).encode()


ED25519_SIGNER, ED25519_RECORD = _signer("ed25519-sha256")


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_dkimpy_verifies_our_signature(algorithm: str) -> None:
    signer, record = _signer(algorithm)
    signing = signer.sign(MESSAGE)
    assert signing.result == "signed"
    asked: list[bytes] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        asked.append(name)
        return record

    signed = signing.header + MESSAGE
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert asked == [b"s1._domainkey.example.org."]
    header = signing.header.decode()
    assert f"a={algorithm};" in header and "c=relaxed/relaxed;" in header and "t=1790000000;" in header
    assert "h=from:from:subject:date:to:message-id;" in header.replace("\r\n\t", " ").replace(": ", ":")
    assert all(len(line) <= 78 for line in header.split("\r\n"))
    # The oversigned From: a second From added in transit breaks the signature; so does a changed body.
    assert not dkim.verify(signing.header + b"From: mallory@evil.test\r\n" + MESSAGE, dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"bye", b"buy"), dnsfunc=dnsfunc)
    # Relaxed canonicalization: whitespace changes in transit do not.
    assert dkim.verify(signed.replace(b"Hello  \t world", b"Hello world"), dnsfunc=dnsfunc)


def test_star_entry_signs_other_domains_with_the_operators_domain() -> None:
    signer, record = _signer(name="*", domain="operator.test")
    other = MESSAGE.replace(b"alice@example.org", b"alice@customer.test")
    signing = signer.sign(other)
    assert signing.result == "signed" and signing.domain == "operator.test"
    assert b"d=operator.test;" in signing.header
    assert dkim.verify(signing.header + other, dnsfunc=lambda name, timeout=5: record)


def test_unsigned_results() -> None:
    signer, _ = _signer()
    assert signer.sign(MESSAGE.replace(b"alice@example.org", b"alice@elsewhere.test")).result == "no_key"
    assert signer.sign(MESSAGE.replace(b"From: Alice <alice@example.org>\r\n", b"")).result == "no_from"
    assert signer.sign(b"From: undisclosed-recipients:;\r\n\r\nbody\r\n").result == "no_from"
    assert signer.sign(b"").result == "no_from"


def test_keys_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    write_private_key(str(path), generate("ed25519-sha256"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_private_key(str(path), "ed25519-sha256")
    with pytest.raises(FileExistsError):
        write_private_key(str(path), generate("ed25519-sha256"))
    with pytest.raises(ValueError, match="no RSA key"):
        load_private_key(str(path), "rsa-sha256")
    assert txt_strings("x" * 600) == ["x" * 255, "x" * 255, "x" * 90]


def test_keygen_command_writes_the_key_and_prints_the_record(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s1.pem"
    assert main(["dkim", "keygen", "Example.ORG", "--selector", "s1", "--bits", "1024", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith('s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    key = load_private_key(str(out), "rsa-sha256")
    assert "".join(printed.split("( ")[1].rsplit(" )", 1)[0].replace('" "', "").strip('"').split()) == \
        dns_record(key).replace(" ", "")
    assert main(["dkim", "keygen", "example.org", "--selector", "s1", "--out", str(out)]) == 1
    assert main(["dkim", "keygen", "example.org", "--selector", "s2", "--bits", "512",
                 "--out", str(tmp_path / "weak.pem")]) == 1
    assert main(["dkim", "keygen", "example.org", "--selector", "s3", "--algorithm", "ed25519",
                 "--out", str(tmp_path / "e.pem")]) == 0
    assert "k=ed25519; p=" in capsys.readouterr().out


@pytest.mark.parametrize(("table", "key"), [
    ({"domains": {"example.org": {"selector": "s1"}}}, "dkim.domains.example.org.key_file"),
    ({"domains": {"example.org": {"selector": "", "key_file": "k"}}}, "dkim.domains.example.org.selector"),
    ({"domains": {"example.org": {"selector": "s", "key_file": "k", "algorithm": "rsa-sha1"}}},
     "dkim.domains.example.org.algorithm"),
    ({"domains": {"*": {"selector": "s", "key_file": "k"}}}, "dkim.domains.*.domain"),
    ({"domains": {"bad domain": {"selector": "s", "key_file": "k"}}}, "dkim.domains.bad domain"),
    ({"domains": {"example.org": {"selector": "s", "key_file": "k", "colour": "red"}}},
     "dkim.domains.example.org.colour"),
])
def test_bad_dkim_configuration_names_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"dkim": table}, environ={})
    assert caught.value.key == key


def test_config_check_loads_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k.pem"
    write_private_key(str(key), generate("ed25519-sha256"))
    config = tmp_path / "c.toml"
    config.write_text(f'[dkim.domains."example.org"]\nselector = "s1"\nkey_file = "{key}"\n'
                      'algorithm = "rsa-sha256"\n')
    assert main(["config", "check", str(config)]) == 2
    assert "dkim.domains.example.org.key_file" in capsys.readouterr().err
    config.write_text(config.read_text().replace("rsa-sha256", "ed25519-sha256"))
    assert main(["config", "check", str(config)]) == 0
