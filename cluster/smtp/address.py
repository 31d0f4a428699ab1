"""Mailbox addresses as SMTP carries them: parsing of MAIL FROM / RCPT TO paths and their parameters.

Grammar: RFC 5321 4.1.2 (Path, Mailbox, Local-part, Domain, address-literal) and 4.1.3 (address literals),
extended by RFC 6531 3.3 (UTF-8 in local parts and U-label domains, only with SMTPUTF8). Length limits:
RFC 5321 4.5.3.1.1-3 (local part 64, domain 255, path 256 octets).

Inputs are the text of a command after "MAIL FROM:" / "RCPT TO:"; outputs are `Address` values; every
problem raises `AddressError` (or `ParameterError`) carrying the exact `Reply` to send, never a traceback.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from cluster.domains import domain_key
from cluster.smtp import replies
from cluster.smtp.replies import Reply

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2 (implied here by MAX_PATH, which counts "<", "@" and ">" too)
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, punctuation included

# RFC 5322 3.2.3 atext, as used by RFC 5321 Atom.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LDH_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
_GENERAL_LITERAL_TAG = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
_PARAM_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")

# Builds the error reply for one kind of path (replies.bad_sender / replies.bad_recipient).
_ErrorFactory = Callable[[str], Reply]


class SmtpSyntaxError(ValueError):
    """A command argument is malformed; `reply` is what the server answers."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class AddressError(SmtpSyntaxError):
    """A reverse-path or forward-path is malformed."""


class ParameterError(SmtpSyntaxError):
    """The esmtp-params after a path are malformed."""


@dataclass(frozen=True, init=False)
class Address:
    """A mailbox: `local_part` unquoted (as its content), `domain` as written (U-label, A-label or literal).

    `domain` is "" only for the special recipient <Postmaster> (RFC 5321 4.1.1.3), which has no domain.
    """

    local_part: str
    domain: str

    def __init__(self, local_part: str, domain: str) -> None:
        # One per MAIL and RCPT: the dict filled at once, not two frozen `object.__setattr__` calls.
        self.__dict__.update(local_part=local_part, domain=domain)

    @property
    def ascii_domain(self) -> str:
        """Lower-cased IDNA A-label form (address literals lower-cased), the key for queueing and routing."""
        return domain_key(self.domain)

    @property
    def is_utf8(self) -> bool:
        return not (self.local_part.isascii() and self.domain.isascii())

    def __str__(self) -> str:
        """The path's text without brackets (the local part quoted when it must be); made once per Address,
        since the session, the policy checks and the inject each ask for it."""
        text: str | None = self.__dict__.get("_text")
        if text is None:
            local = self.local_part if _is_dot_string(self.local_part) else _quote(self.local_part)
            text = f"{local}@{self.domain}" if self.domain else local
            object.__setattr__(self, "_text", text)  # not a field: equality and hashing ignore it
        return text


def _is_atext(char: str) -> bool:
    # RFC 6531 3.3: atext is extended with UTF8-non-ascii.
    return char in _ATEXT or ord(char) > 127


# Dot-string = Atom *("." Atom), Atom = 1*atext (RFC 5321 4.1.2), atext extended by RFC 6531 as in _is_atext.
_ATOM = "[A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~\u0080-\U0010ffff]+"
_DOT_STRING = re.compile(f"{_ATOM}(?:\\.{_ATOM})*")


def _is_dot_string(text: str) -> bool:
    return _DOT_STRING.fullmatch(text) is not None


# The everyday address (ASCII dot-atom local part of at most 64 characters, LDH domain of labels of 1-63
# characters that neither start nor end with "-"), accepted without running the full parser: everything it
# matches, within the lengths checked next to it, the full parser accepts too, as the same Address (a property
# test holds the two together). Anything else goes through the full parser. Used for MAIL FROM / RCPT TO here
# and for the envelopes of Inject frames on the bus (cluster.bus.schemas), so up to three times per recipient
# in a cluster: one regex of two character runs, and the dots and hyphens checked by substring searches (a
# regex of repeated groups with bounded label lengths took 3 us an address).
_PLAIN_LOCAL, _PLAIN_DOMAIN = "([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64})", "([A-Za-z0-9.-]+)"
_PLAIN_ADDRESS = re.compile(f"{_PLAIN_LOCAL}@{_PLAIN_DOMAIN}")
_PLAIN_PATH = re.compile(f"<{_PLAIN_LOCAL}@{_PLAIN_DOMAIN}>")
_MAX_ADDRESS = MAX_PATH - 2  # the path's angle brackets count towards its limit
_MAX_LABEL = 63


def is_plain_address(address: str) -> bool:
    """True for an address (no brackets) of the everyday form that the full parser is known to accept."""
    match = _PLAIN_ADDRESS.fullmatch(address)
    return match is not None and len(address) <= _MAX_ADDRESS and _plain_parts(*match.groups())


def _plain_parts(local: str, domain: str) -> bool:
    """The dots and hyphens of a local part and domain made of the everyday characters: no empty atom, no
    empty label, no label that starts or ends with "-" or is longer than 63."""
    if local[0] == "." or local[-1] == "." or ".." in local:
        return False
    return not (domain[0] in ".-" or domain[-1] in ".-" or ".." in domain or ".-" in domain or "-." in domain
                or (len(domain) > _MAX_LABEL and max(map(len, domain.split("."))) > _MAX_LABEL))


def plain_path(text: str) -> Address | None:
    """`<local@domain>` of the everyday form (see is_plain_address) as an Address; None: ask the full parser.
    (What parse_forward_path and parse_reverse_path give for such a path; the SMTP machine asks it first.)"""
    match = _PLAIN_PATH.fullmatch(text)
    if match is None or len(text) > MAX_PATH:
        return None
    local, domain = match.groups()
    if not _plain_parts(local, domain):
        return None
    address = Address(local, domain)
    address.__dict__["_text"] = text[1:-1]  # what __str__ would make: a dot-atom needs no quoting
    return address


def _is_qtext_char(char: str) -> bool:
    # RFC 5321 qtextSMTP (%d32-33 / %d35-91 / %d93-126) plus RFC 6531 UTF8-non-ascii.
    code = ord(char)
    return (32 <= code <= 126 and char not in '"\\') or code > 127


def _quote(local: str) -> str:
    return '"' + "".join("\\" + c if c in '"\\' else c for c in local) + '"'


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def split_path_and_parameters(text: str) -> tuple[str, str]:
    """Split "<path> PARAM=x ..." into the path (brackets included) and the parameter text.

    The closing ">" is found while honouring quoted strings, so `<"a>b"@x>` is one path. A path with no
    angle brackets is returned whole as the path (the parser then refuses it).
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        path, _, params = text.partition(" ")
        return path, params.strip(" ")
    if '"' not in text:  # no quoted string: the first ">" closes the path
        end = text.find(">")
        return (text, "") if end < 0 else (text[: end + 1], text[end + 1 :].strip(" "))
    in_quotes = False
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif in_quotes and char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return text[: index + 1], text[index + 1 :].strip(" ")
    return text, ""


def parse_reverse_path(text: str, *, smtputf8: bool = False) -> Address | None:
    """Parse a MAIL FROM path; `<>` gives None. Problems raise AddressError with 501 5.1.7 (or 553 5.6.7)."""
    stripped = text.strip(" ")
    if stripped == "<>":
        return None
    return plain_path(stripped) or _parse_path(stripped, smtputf8=smtputf8, error=replies.bad_sender)


def parse_forward_path(text: str, *, smtputf8: bool = False) -> Address:
    """Parse a RCPT TO path. Problems raise AddressError with 501 5.1.3 (or 553 5.6.7).

    `<Postmaster>` without a domain is accepted (RFC 5321 4.1.1.3) as Address("Postmaster", "").
    """
    stripped = text.strip(" ")
    if len(stripped) == 12 and stripped.lower() == "<postmaster>":
        return Address(stripped[1:-1], "")
    return plain_path(stripped) or _parse_path(stripped, smtputf8=smtputf8, error=replies.bad_recipient)


def _parse_path(text: str, *, smtputf8: bool, error: _ErrorFactory) -> Address:
    text = text.strip(" ")
    if not (text.startswith("<") and text.endswith(">") and len(text) >= 2):
        raise AddressError(error("the address must be enclosed in <angle brackets>"))
    if _octets(text) > MAX_PATH:
        raise AddressError(error(f"path longer than {MAX_PATH} octets (RFC 5321 4.5.3.1.3)"))
    if not text.isascii() and not smtputf8:
        raise AddressError(replies.UTF8_NEEDS_SMTPUTF8)
    inner = text[1:-1]
    inner = _strip_source_route(inner, error)
    local, domain = _split_mailbox(inner, error)
    _check_domain(domain, error)
    return Address(local, domain)


def _strip_source_route(inner: str, error: _ErrorFactory) -> str:
    """RFC 5321 4.1.2 A-d-l and Appendix C: "@a,@b:user@c" -- accept, check and ignore the route."""
    if not inner.startswith("@"):
        return inner
    route, colon, rest = inner.partition(":")
    if not colon:
        raise AddressError(error("source route without ':'"))
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise AddressError(error("source route hop must start with '@'"))
        _check_domain(hop[1:], error)
    return rest


def _split_mailbox(inner: str, error: _ErrorFactory) -> tuple[str, str]:
    if inner.startswith('"'):
        local, rest = _parse_quoted_local(inner, error)
        if not rest.startswith("@"):
            raise AddressError(error("expected '@' after the quoted local part"))
        domain = rest[1:]
    else:
        local, at, domain = inner.rpartition("@")
        if not at:
            raise AddressError(error("missing '@domain'"))
        if not _is_dot_string(local):
            raise AddressError(error(f"invalid local part {local!r}"))
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError(error(f"local part longer than {MAX_LOCAL_PART} octets (RFC 5321 4.5.3.1.1)"))
    return local, domain


def _parse_quoted_local(inner: str, error: _ErrorFactory) -> tuple[str, str]:
    """Quoted-string (RFC 5321 4.1.2): returns the unquoted content and the text after the closing quote."""
    content: list[str] = []
    index = 1
    while index < len(inner):
        char = inner[index]
        if char == "\\":
            if index + 1 >= len(inner) or not (32 <= ord(inner[index + 1]) <= 126):
                raise AddressError(error("invalid quoted-pair in quoted local part"))
            content.append(inner[index + 1])
            index += 2
            continue
        if char == '"':
            return "".join(content), inner[index + 1 :]
        if not _is_qtext_char(char):
            raise AddressError(error("invalid character in quoted local part"))
        content.append(char)
        index += 1
    raise AddressError(error("unterminated quoted local part"))


def _check_domain(domain: str, error: _ErrorFactory) -> None:
    if not domain:
        raise AddressError(error("empty domain"))
    if domain.startswith("["):
        _check_address_literal(domain, error)
        return
    # No separate check for MAX_DOMAIN: the path limit (256 with "<", "@", ">" and a local part) is stricter.
    for label in domain.split("."):
        if label.isascii():
            if not _LDH_LABEL.match(label) or len(label) > 63:
                raise AddressError(error(f"invalid domain {domain!r}"))
            continue
        # RFC 6531 3.3: sub-domain =/ U-label; it must convert to a valid A-label.
        try:
            ascii_label = label.encode("idna").decode("ascii")
        except UnicodeError:
            raise AddressError(error(f"invalid internationalized domain {domain!r}")) from None
        if not _LDH_LABEL.match(ascii_label):
            raise AddressError(error(f"invalid internationalized domain {domain!r}"))


def _check_address_literal(literal: str, error: _ErrorFactory) -> None:
    """RFC 5321 4.1.3: [IPv4], [IPv6:...] or [tag:content] (General-address-literal)."""
    if not literal.endswith("]") or len(literal) < 3:
        raise AddressError(error(f"invalid address literal {literal!r}"))
    body = literal[1:-1]
    if body[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(body[5:])
        except ValueError:
            raise AddressError(error(f"invalid IPv6 address literal {literal!r}")) from None
        return
    tag, colon, content = body.partition(":")
    if colon:
        # General-address-literal: Standardized-tag ":" 1*dcontent (printable US-ASCII except [ \ ]).
        if (
            not _GENERAL_LITERAL_TAG.match(tag)
            or not content
            or not all(33 <= ord(c) <= 126 and c not in "[\\]" for c in content)
        ):
            raise AddressError(error(f"invalid address literal {literal!r}"))
        return
    try:
        ipaddress.IPv4Address(body)
    except ValueError:
        raise AddressError(error(f"invalid IPv4 address literal {literal!r}")) from None


def parse_mail_parameters(text: str) -> dict[str, str | None]:
    """esmtp-params (RFC 5321 4.1.2): "KEY[=value]" separated by spaces; keys upper-cased, values kept.

    Raises ParameterError (501 5.5.4) for a malformed or repeated keyword. Which keywords are allowed is the
    server's decision, not this parser's.
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if not _PARAM_KEYWORD.match(keyword):
            raise ParameterError(replies.PARAMETER_SYNTAX)
        if equals and (not value or not all(ord(c) > 127 or (33 <= ord(c) <= 126 and c != "=") for c in value)):
            raise ParameterError(replies.PARAMETER_SYNTAX)
        key = keyword.upper()
        if key in params:
            raise ParameterError(replies.DUPLICATE_PARAMETER)
        params[key] = value if equals else None
    return params
