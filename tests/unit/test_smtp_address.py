"""Address parsing for MAIL FROM / RCPT TO (RFC 5321 4.1.2, 4.1.3, 4.5.3.1; RFC 6531 3.3)."""

from __future__ import annotations

import pytest

from cluster.smtp import replies
from cluster.smtp.address import (
    Address,
    AddressError,
    ParameterError,
    parse_forward_path,
    parse_mail_parameters,
    parse_reverse_path,
    split_path_and_parameters,
)

# With "<u@" and ">" this makes a path of exactly 256 octets.
LONGEST_DOMAIN = ".".join(["a" * 63] * 3) + "." + "b" * 60


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<user@example.com>", Address("user", "example.com")),
        ("<First.Last@Sub.Example.COM>", Address("First.Last", "Sub.Example.COM")),
        ("<a+tag@example.com>", Address("a+tag", "example.com")),
        ("<!#$%&'*+-/=?^_`{|}~@example.com>", Address("!#$%&'*+-/=?^_`{|}~", "example.com")),
        ('<"john doe"@example.com>', Address("john doe", "example.com")),
        ('<"a\\"b"@example.com>', Address('a"b', "example.com")),
        ('<"a\\\\b"@example.com>', Address("a\\b", "example.com")),
        ('<"a>b@c"@example.com>', Address("a>b@c", "example.com")),
        ('<""@example.com>', Address("", "example.com")),
        ("<user@[192.0.2.1]>", Address("user", "[192.0.2.1]")),
        ("<user@[IPv6:2001:db8::1]>", Address("user", "[IPv6:2001:db8::1]")),
        ("<user@[ipv6:::1]>", Address("user", "[ipv6:::1]")),
        ("<user@[x-tag:some-content]>", Address("user", "[x-tag:some-content]")),
        ("<@relay.example,@other.example:user@example.com>", Address("user", "example.com")),
        ("<@relay.example:user@example.com>", Address("user", "example.com")),
        ("<user@a.b.c.d.example>", Address("user", "a.b.c.d.example")),
        ("<user@123.example>", Address("user", "123.example")),
        ("<" + "l" * 64 + "@example.com>", Address("l" * 64, "example.com")),
        # 256 octets exactly: the longest path allowed (RFC 5321 4.5.3.1.3).
        (f"<u@{LONGEST_DOMAIN}>", Address("u", LONGEST_DOMAIN)),
    ],
)
def test_valid_paths(text: str, expected: Address) -> None:
    assert parse_forward_path(text) == expected
    assert parse_reverse_path(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("user@example.com", "angle brackets"),
        ("<user@example.com", "angle brackets"),
        ("<>", "missing '@domain'"),
        ("<user>", "missing '@domain'"),
        ("<@example.com>", "source route"),
        ("<user@>", "empty domain"),
        ("<.user@example.com>", "invalid local part"),
        ("<user.@example.com>", "invalid local part"),
        ("<us..er@example.com>", "invalid local part"),
        ("<us er@example.com>", "invalid local part"),
        ("<us(er@example.com>", "invalid local part"),
        ('<"unterminated@example.com>', "unterminated quoted"),
        ('<"a"b@example.com>', "expected '@'"),
        ('<"a\tb"@example.com>', "invalid character"),
        ('<"a\\\x01"@example.com>', "invalid quoted-pair"),
        ('<"a\\>', "invalid quoted-pair"),
        ("<@relay.example,other.example:user@example.com>", "hop must start with '@'"),
        ("<@:user@example.com>", "empty domain"),
        ("<user@-example.com>", "invalid domain"),
        ("<user@example-.com>", "invalid domain"),
        ("<user@exa_mple.com>", "invalid domain"),
        ("<user@example..com>", "invalid domain"),
        ("<user@example.com.>", "invalid domain"),
        ("<user@[192.0.2.256]>", "invalid IPv4"),
        ("<user@[192.0.2]>", "invalid IPv4"),
        ("<user@[IPv6:2001:db8::g]>", "invalid IPv6"),
        ("<user@[IPv6:192.0.2.1]>", "invalid IPv6"),
        ("<user@[]>", "invalid address literal"),
        ("<user@[192.0.2.1>", "invalid address literal"),
        ("<user@[tag:]>", "invalid address literal"),
        ("<@relay.example user@example.com>", "source route"),
        ("<@bad_hop:user@example.com>", "invalid domain"),
        ("<relay.example:user@example.com>", "invalid local part"),
        ("<" + "l" * 65 + "@example.com>", "local part longer than 64"),
        ("<user@" + "a" * 64 + ".example>", "invalid domain"),
        ("<user@" + ".".join(["a" * 60] * 5) + ">", "path longer than 256"),
        (f"<uu@{LONGEST_DOMAIN}>", "path longer than 256"),
    ],
)
def test_invalid_recipient_paths(text: str, problem: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_forward_path(text)
    reply = caught.value.reply
    assert (reply.code, reply.enhanced) == (501, "5.1.3")
    assert problem in reply.text


def test_invalid_sender_uses_5_1_7() -> None:
    with pytest.raises(AddressError) as caught:
        parse_reverse_path("<no-domain>")
    assert caught.value.reply == replies.bad_sender("missing '@domain'")


def test_null_reverse_path() -> None:
    assert parse_reverse_path("<>") is None
    assert parse_reverse_path(" <> ") is None


def test_postmaster_without_domain_is_a_valid_recipient() -> None:
    assert parse_forward_path("<Postmaster>") == Address("Postmaster", "")
    assert parse_forward_path("<postmaster>") == Address("postmaster", "")
    with pytest.raises(AddressError):
        parse_reverse_path("<Postmaster>")


@pytest.mark.parametrize(
    "text",
    ["<j\u00f6rg@example.com>", "<user@b\u00fccher.example>", '<"\u00e9 e"@example.com>'],
)
def test_utf8_needs_smtputf8(text: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_forward_path(text)
    assert caught.value.reply == replies.UTF8_NEEDS_SMTPUTF8
    assert parse_forward_path(text, smtputf8=True).is_utf8


def test_idn_domain_ascii_form() -> None:
    address = parse_forward_path("<user@B\u00fccher.Example>", smtputf8=True)
    assert address.domain == "B\u00fccher.Example"
    assert address.ascii_domain == "xn--bcher-kva.example"
    assert not address.is_utf8 or address.local_part == "user"
    assert parse_forward_path("<u@Example.COM>").ascii_domain == "example.com"
    assert parse_forward_path("<u@xn--bcher-kva.example>").ascii_domain == "xn--bcher-kva.example"


@pytest.mark.parametrize("domain", ["\u00fc\u0000x.example", "\u00fc" * 70 + ".example"])
def test_invalid_idn_domain(domain: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_forward_path(f"<user@{domain}>", smtputf8=True)
    assert "invalid internationalized domain" in caught.value.reply.text


def test_utf8_local_part_length_counts_octets() -> None:
    with pytest.raises(AddressError):
        parse_forward_path("<" + "\u00e9" * 33 + "@example.com>", smtputf8=True)
    assert parse_forward_path("<" + "\u00e9" * 32 + "@example.com>", smtputf8=True).local_part == "\u00e9" * 32


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("user", "example.com"), "user@example.com"),
        (Address("john doe", "example.com"), '"john doe"@example.com'),
        (Address('a"b\\c', "example.com"), '"a\\"b\\\\c"@example.com'),
        (Address("", "example.com"), '""@example.com'),
        (Address(".dot", "example.com"), '".dot"@example.com'),
        (Address("Postmaster", ""), "Postmaster"),
        (Address("j\u00f6rg", "b\u00fccher.example"), "j\u00f6rg@b\u00fccher.example"),
    ],
)
def test_str_requotes_when_needed(address: Address, text: str) -> None:
    assert str(address) == text
    if address.domain:
        assert parse_forward_path(f"<{address}>", smtputf8=True) == address


@pytest.mark.parametrize(
    ("text", "path", "params"),
    [
        ("<a@b> SIZE=10 BODY=8BITMIME", "<a@b>", "SIZE=10 BODY=8BITMIME"),
        ("  <a@b>", "<a@b>", ""),
        ('<"x> y"@b> SMTPUTF8', '<"x> y"@b>', "SMTPUTF8"),
        ('<"x\\" >"@b>', '<"x\\" >"@b>', ""),
        ("a@b SIZE=1", "a@b", "SIZE=1"),
        ("<a@b", "<a@b", ""),
    ],
)
def test_split_path_and_parameters(text: str, path: str, params: str) -> None:
    assert split_path_and_parameters(text) == (path, params)


def test_parse_mail_parameters() -> None:
    assert parse_mail_parameters("") == {}
    assert parse_mail_parameters("size=10  body=8bitmime SMTPUTF8") == {
        "SIZE": "10",
        "BODY": "8bitmime",
        "SMTPUTF8": None,
    }
    assert parse_mail_parameters("X-EXT=caf\u00e9") == {"X-EXT": "caf\u00e9"}


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("=10", replies.PARAMETER_SYNTAX),
        ("SIZE=", replies.PARAMETER_SYNTAX),
        ("-X=1", replies.PARAMETER_SYNTAX),
        ("SIZE=1=2", replies.PARAMETER_SYNTAX),
        ("SIZE=1 size=2", replies.DUPLICATE_PARAMETER),
        ("KEY=a\tb", replies.PARAMETER_SYNTAX),
    ],
)
def test_invalid_mail_parameters(text: str, reply: object) -> None:
    with pytest.raises(ParameterError) as caught:
        parse_mail_parameters(text)
    assert caught.value.reply == reply


def test_address_text_is_made_once_and_leaves_equality_alone() -> None:
    quoted = Address("john doe", "example.com")
    assert str(quoted) == '"john doe"@example.com' and str(quoted) is str(quoted)
    assert quoted == Address("john doe", "example.com") and hash(quoted) == hash(Address("john doe", "example.com"))
    assert str(Address("Postmaster", "")) == "Postmaster"
