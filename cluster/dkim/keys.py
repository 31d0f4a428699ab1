"""DKIM keys: make a key pair, load a private key, and the DNS TXT record that publishes the public key.

`generate(algorithm, bits)` makes an RSA (rsa-sha256, RFC 6376 3.3) or Ed25519 (ed25519-sha256, RFC 8463) private
key; `write_private_key(path, key)` writes it as unencrypted PKCS#8 PEM with mode 0600 and refuses to overwrite
a file. `load_private_key(path, algorithm)` reads one back and checks it suits the algorithm. `dns_record(key)`
is the TXT record text (RFC 6376 3.6.1: "v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>"; RFC 8463 4: k=ed25519
and p= the raw 32-byte public key); `txt_strings(text)` cuts it into the <= 255-octet strings a TXT record holds.

Failure modes: `KeyFileError` (file missing, unreadable, not a PEM private key, wrong key type, RSA key under
1024 bits, RFC 8301 3.2) with a message naming the file; `FileExistsError` from `write_private_key`.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
# RFC 8301 3.2: verifiers must not consider keys under 1024 bits valid; 2048 is the common choice.
MIN_RSA_BITS = 1024
DEFAULT_RSA_BITS = 2048
TXT_STRING_MAX = 255


class KeyFileError(ValueError):
    """A DKIM private key file cannot be used; the message names the file and why."""


def generate(algorithm: str, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate()
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits (RFC 8301 3.2), got {bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_private_key(path: str, key: PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_private_key(path: str, algorithm: str) -> PrivateKey:
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if algorithm == "ed25519-sha256":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"{path} holds no Ed25519 key, which algorithm ed25519-sha256 needs")
        return key
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"{path} holds no RSA key, which algorithm rsa-sha256 needs")
    if key.key_size < MIN_RSA_BITS:
        raise KeyFileError(f"{path}: an RSA key of {key.key_size} bits is too short (RFC 8301 3.2: at least 1024)")
    return key


def dns_record(key: PrivateKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


def txt_strings(text: str) -> list[str]:
    """The record cut into strings of at most 255 octets (RFC 1035 3.3.14); verifiers join them again."""
    return [text[i:i + TXT_STRING_MAX] for i in range(0, len(text), TXT_STRING_MAX)] or [""]


def algorithm_name(short: str) -> str:
    """The configuration's algorithm name for the keygen option: "rsa" -> "rsa-sha256"."""
    return {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}[short]
