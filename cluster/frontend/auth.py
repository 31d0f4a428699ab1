"""SMTP AUTH (RFC 4954) with the SASL mechanisms PLAIN (RFC 4616) and LOGIN, as pure logic (no sockets).

One `SmtpAuth` per SMTP session. The glue hands it the AUTH command's argument (`command()`) and every line
the client sends after a 334 challenge (`line()`); each call returns the next step:
- a `Reply`: send it; 334 means the exchange goes on (the next client line is a response), any other code
  ends the exchange;
- `Verify(username, password)`: the client has sent its credentials. The glue checks them against the users
  file (off the event loop: scrypt is slow on purpose) and calls `verified(ok)`, which returns the 235 or
  535 reply to send, or `refused(reply)` when the session's policy refuses the login.

Rules (RFC 4954 4 and 6): AUTH only over TLS (538 5.7.11), only after EHLO, not during a mail transaction
and not twice (503 5.5.1); unknown mechanism 504 5.5.4; a response that is not base64 501 5.5.2; "*"
cancels (501 5.7.0); an initial response on the AUTH line is accepted ("=" is an empty one).
PLAIN's authorization identity must be empty or the authentication identity itself: nobody may act as
someone else. Every exchange that starts and does not succeed counts as a failure; `exhausted` becomes True
after `max_failures` of them and the glue then ends the session with `replies.AUTH_TOO_MANY_FAILURES`.

Passwords live only in `Verify` (left out of its repr) and are never logged.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from cluster.smtp import replies
from cluster.smtp.replies import Reply

MECHANISMS = ("PLAIN", "LOGIN")
EHLO_KEYWORD = "AUTH " + " ".join(MECHANISMS)

# The LOGIN mechanism's prompts, base64 of "Username:" and "Password:" (draft-murchison-sasl-login).
_USERNAME_PROMPT = base64.b64encode(b"Username:").decode("ascii")
_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode("ascii")
# RFC 4616 2: each of authzid, authcid and passwd is at most 255 octets of UTF-8.
_MAX_FIELD = 255


@dataclass(frozen=True)
class Verify:
    """Credentials to check; the glue answers with `SmtpAuth.verified(ok)`."""

    username: str
    password: str = field(repr=False)


Step = Reply | Verify


class _Malformed(ValueError):
    """A response that is not valid base64 or not a valid message of its mechanism."""


def _decode(text: str) -> bytes:
    """Strict base64 (RFC 4954 4): "=" stands for an empty response."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _Malformed("not base64") from None


def _utf8_field(octets: bytes, *, may_be_empty: bool) -> str:
    if len(octets) > _MAX_FIELD or (not octets and not may_be_empty):
        raise _Malformed("field length")
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("not UTF-8") from None


def parse_plain(message: bytes) -> tuple[str, str, str]:
    """RFC 4616 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd -> (authzid, authcid, passwd)."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise _Malformed("PLAIN needs exactly two NULs")
    authzid = _utf8_field(parts[0], may_be_empty=True)
    authcid = _utf8_field(parts[1], may_be_empty=False)
    password = _utf8_field(parts[2], may_be_empty=False)
    return authzid, authcid, password


class SmtpAuth:
    """The AUTH state of one SMTP session: the exchange in progress, who logged in, how many failures."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.user: str | None = None
        self.failures = 0
        self._mechanism: str | None = None
        self._username: str | None = None  # LOGIN: the username, while waiting for the password
        self._verifying: str | None = None  # the username being verified

    @property
    def exhausted(self) -> bool:
        return self.failures >= self.max_failures

    @property
    def in_exchange(self) -> bool:
        return self._mechanism is not None

    def command(self, argument: str, *, tls: bool, greeted: bool, in_transaction: bool) -> Step:
        """The AUTH command: "mechanism [initial-response]" (RFC 4954 4)."""
        if not tls:
            return replies.AUTH_ENCRYPTION_REQUIRED
        if not greeted:
            return replies.AUTH_NEED_EHLO
        if self.user is not None:
            return replies.AUTH_ALREADY_AUTHENTICATED
        if in_transaction:
            return replies.AUTH_NOT_IN_TRANSACTION
        words = argument.strip(" ").split(" ")
        if not words[0] or len(words) > 2:
            return replies.AUTH_SYNTAX
        mechanism = words[0].upper()
        if mechanism not in MECHANISMS:
            return replies.AUTH_UNKNOWN_MECHANISM
        self._mechanism = mechanism
        if len(words) == 2:
            return self._response(words[1])
        return replies.auth_challenge("" if mechanism == "PLAIN" else _USERNAME_PROMPT)

    def line(self, line: bytes | None) -> Step:
        """A client line after a 334 challenge (None: longer than the limit, discarded)."""
        if self._mechanism is None:
            return self._fail(replies.AUTH_CANNOT_DECODE)  # not reachable through the state machine; refuse safely
        if line is None:
            return self._fail(replies.AUTH_LINE_TOO_LONG)
        try:
            text = line.decode("ascii").strip(" ")
        except UnicodeDecodeError:
            return self._fail(replies.AUTH_CANNOT_DECODE)
        if text == "*":
            return self._fail(replies.AUTH_CANCELLED)  # RFC 4954 4: the client cancels the exchange
        return self._response(text)

    def verified(self, ok: bool) -> Reply:
        """The result of checking the `Verify` step's credentials: the reply to send."""
        username = self._verifying
        self._verifying = None
        if ok and username is not None:
            self.user = username
            return replies.AUTH_SUCCEEDED
        return self._fail(replies.AUTH_INVALID_CREDENTIALS)

    def refused(self, reply: Reply) -> Reply:
        """The session's policy refused this login (e.g. a disabled account): `reply` is sent instead of 235;
        a 5xx refusal counts as a failure, a 4xx one (the check could not be made) does not."""
        self._verifying = None
        if reply.code >= 500:
            return self._fail(reply)
        self._reset()
        return reply

    def cancel(self) -> None:
        """The exchange that `command()` began is not going on (the policy refused AUTH); not a failure."""
        self._verifying = None
        self._reset()

    def temporary_failure(self) -> Reply:
        """The credentials could not be checked (users file unreadable): 454, not counted as a failure."""
        self._reset()
        return replies.AUTH_TEMPORARY_FAILURE

    def _response(self, text: str) -> Step:
        try:
            decoded = _decode(text)
            if self._mechanism == "PLAIN":
                authzid, authcid, password = parse_plain(decoded)
                if authzid and authzid.lower() != authcid.lower():
                    return self._fail(replies.AUTH_INVALID_CREDENTIALS)  # acting as another user is never allowed
                return self._verify(authcid, password)
            if self._username is None:
                self._username = _utf8_field(decoded, may_be_empty=True)
                return replies.auth_challenge(_PASSWORD_PROMPT)
            return self._verify(self._username, _utf8_field(decoded, may_be_empty=True))
        except _Malformed:
            return self._fail(replies.AUTH_CANNOT_DECODE)

    def _verify(self, username: str, password: str) -> Verify:
        self._reset()
        self._verifying = username
        return Verify(username, password)

    def _fail(self, reply: Reply) -> Reply:
        self._reset()
        self.failures += 1
        return reply

    def _reset(self) -> None:
        self._mechanism = None
        self._username = None
