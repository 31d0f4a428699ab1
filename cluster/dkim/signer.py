"""The DKIM signer (RFC 6376, RFC 8463): one DKIM-Signature header field for a message, relaxed/relaxed.

Input: the message as the frontend accepted it (CRLF line ends). `DkimSigner.sign(message)` finds the first
From: address's domain, picks its key (an exact entry of `[dkim.domains]`, else the "*" entry, which signs with
the operator's own domain as d=), and returns a `Signing`: the header field to prepend (b"" when unsigned)
and the result ("signed", "no_key", "no_from", "error", as counted in mtacluster_dkim_signatures_total).

What is signed: the fields named in `dkim.sign_headers` that are present (RFC 6376 5.4.1), every instance,
and From once more than it occurs (oversigned, RFC 6376 8.15); the body hash covers the whole body (no l=).
Tags: v, a, c=relaxed/relaxed, d, s, t (signing time), h, bh, b. The private-key operation runs in OpenSSL
(`cryptography`): RSA PKCS#1 v1.5 over SHA-256 (RFC 6376 3.3.1); Ed25519 over the SHA-256 hash (RFC 8463 3).
Cost: keys are loaded once per process (`from_config`); per message, everything but the private-key operation
is a few tens of microseconds (canon.py); the operation itself is what signing costs (ARCHITECTURE.md,
performance notes, "DKIM").

Failure modes: never raises for message content. A key operation that fails is logged and the message goes
out unsigned with result "error" (refusing the mail would lose more than an unsigned copy costs).
`DkimSigner.from_config` raises `ConfigError` (naming `dkim.domains.D.key_file`) for an unusable key file, at
startup and in `config check`.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from cluster.bus.ring import domain_key
from cluster.config import ConfigError, DkimConfig
from cluster.dkim import metrics
from cluster.dkim.canon import body_hash, fields_by_name, relaxed_header, select_from, split_message
from cluster.dkim.keys import KeyFileError, PrivateKey, load_private_key

log = logging.getLogger(__name__)

# Folding: keep the lines of the header field we write short (RFC 5322 2.1.1 recommends at most 78 characters).
LINE_WIDTH = 76
SIGNATURE_CHUNK = 72
_SIMPLE_FROM = re.compile(r'\s*(?:[\w .-]*<)?([\w.+-]+@[\w.-]+)>?\s*')
# cryptography's parameter objects, made once (RSA PKCS#1 v1.5 over SHA-256, RFC 6376 3.3.1).
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


@dataclass(frozen=True)
class SigningKey:
    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a=
    private_key: PrivateKey


@dataclass(frozen=True)
class Signing:
    header: bytes  # "DKIM-Signature: ...\r\n", or b"" when the message is not signed
    result: str
    domain: str = ""


class DkimSigner:
    def __init__(self, keys: Mapping[str, SigningKey], sign_headers: Sequence[str],
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = {name if name == "*" else domain_key(name): key for name, key in keys.items()}
        self._names = tuple(dict.fromkeys(["from", *(h.lower() for h in sign_headers)]))
        self._wanted = frozenset(self._names)
        self._clock = clock
        # The labelled series, looked up once (a labels() call per message costs more than the rest of the
        # bookkeeping together).
        self._counted = {result: metrics.SIGNATURES.labels(result=result) for result in metrics.SIGNATURE_RESULTS}

    @classmethod
    def from_config(cls, config: DkimConfig) -> DkimSigner | None:
        """None when no domain has a key; ConfigError naming the key_file key for an unusable key file."""
        if not config.domains:
            return None
        keys = {}
        for name, entry in config.domains.items():
            try:
                private_key = load_private_key(entry.key_file, entry.algorithm)
            except KeyFileError as exc:
                raise ConfigError(f"dkim.domains.{name}.key_file", str(exc)) from None
            keys[name] = SigningKey(domain_key(entry.domain or name), entry.selector, entry.algorithm, private_key)
        return cls(keys, config.sign_headers)

    def key_for(self, from_domain: str) -> SigningKey | None:
        return self._keys.get(domain_key(from_domain)) or self._keys.get("*")

    def sign(self, message: bytes) -> Signing:
        started = time.perf_counter()
        fields, body = split_message(message)
        # One pass over the header fields finds From: and every field to sign.
        by_name = fields_by_name(fields, self._wanted)
        from_domain = _from_domain(by_name.get("from"))
        if from_domain is None:
            self._counted["no_from"].inc()
            return Signing(b"", "no_from")
        key = self.key_for(from_domain)
        if key is None:
            self._counted["no_key"].inc()
            return Signing(b"", "no_key")
        try:
            header = self._signature(key, by_name, body)
        except (ValueError, TypeError) as exc:  # what cryptography raises for a key it cannot use
            log.error("DKIM signing with %s (selector %s) failed: %s", key.domain, key.selector, exc)
            self._counted["error"].inc()
            return Signing(b"", "error", key.domain)
        self._counted["signed"].inc()
        metrics.SIGN_DURATION.observe(time.perf_counter() - started)
        return Signing(header, "signed", key.domain)

    def _signature(self, key: SigningKey, by_name: dict[str, list[bytes]], body: bytes) -> bytes:
        body_digest = base64.b64encode(body_hash(body)).decode("ascii")
        listed, covered = select_from(by_name, self._names)
        canonical = [relaxed_header(f) for f in covered]
        tags = ["v=1;", f"a={key.algorithm};", "c=relaxed/relaxed;", f"d={key.domain};", f"s={key.selector};",
                f"t={int(self._clock())};", *_h_tag(listed), f"bh={body_digest};", "b="]
        unsigned = _fold("DKIM-Signature:", tags)
        # Its relaxed form, without the regexes: the words hold no whitespace, and each fold is one SP again.
        canonical.append(b"dkim-signature:" + " ".join(tags).encode("ascii"))
        data = b"".join(canonical)
        if isinstance(key.private_key, ed25519.Ed25519PrivateKey):
            signature = key.private_key.sign(hashlib.sha256(data).digest())
        else:
            signature = key.private_key.sign(data, _PKCS1V15, _SHA256)
        encoded = base64.b64encode(signature)
        # The first piece fills the line "b=" is on; the rest go on lines of their own.
        first = max(8, LINE_WIDTH - len(unsigned.rpartition(b"\n")[2]))
        chunks = [encoded[:first]] + [encoded[i:i + SIGNATURE_CHUNK] for i in range(first, len(encoded),
                                                                                     SIGNATURE_CHUNK)]
        return unsigned + b"\r\n\t".join(chunks) + b"\r\n"


def _h_tag(names: list[str]) -> list[str]:
    """The h= tag as words to fold between (FWS is allowed after each colon, RFC 6376 3.5)."""
    words = []
    for start in range(0, len(names), 6):
        words.append(":".join(names[start:start + 6]) + ":")
    words[0] = "h=" + words[0]
    words[-1] = words[-1][:-1] + ";"
    return words


def _fold(name: str, words: list[str]) -> bytes:
    """Join words with single spaces, folding (CRLF TAB) where a line would grow past LINE_WIDTH.

    Relaxed canonicalization turns each fold back into one space, so the hash sees the same text either way.
    """
    lines = [name]
    for word in words:
        if len(lines[-1]) + 1 + len(word) > LINE_WIDTH and lines[-1] != name:
            lines.append("\t" + word)
        else:
            lines[-1] += " " + word
    return "\r\n".join(lines).encode("ascii")


def _from_domain(from_fields: list[bytes] | None) -> str | None:
    """The domain of the first address of the first From: field, or None."""
    if not from_fields:
        return None
    value = from_fields[0].partition(b":")[2].replace(b"\r\n", b"").decode("utf-8", "replace")
    # The common forms ("<a@b>", "Name <a@b>", "a@b") without the full RFC 5322 parser.
    simple = _SIMPLE_FROM.fullmatch(value)
    addresses = [simple.group(1)] if simple else [a for _, a in email.utils.getaddresses([value])]
    for address in addresses:
        local, at, domain = address.rpartition("@")
        if at and local and domain:
            return domain.strip().rstrip(".")
    return None
