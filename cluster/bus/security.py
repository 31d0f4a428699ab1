"""CURVE encryption and authentication of bus traffic (ARCHITECTURE.md contract 5).

The cluster has one CURVE key pair, made by `mtacluster keys FILE` and given to every process (in Kubernetes,
a Secret mounted as `bus.curve_key_file`). Shards are CURVE servers with it; frontends, workers and the admin
CLI are CURVE clients that present the same key pair, and the shard's ZAP handler admits only clients holding
it. So bus traffic is encrypted, and only processes holding the cluster secret can inject or take jobs.
Without a key file (all shards on loopback, as in `mtacluster up`), sockets are plain; the configuration
refuses an off-host shard endpoint without a key file.

Key file format: two lines, "public = <z85>" and "secret = <z85>". The secret is never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth.asyncio

from cluster.config import BusConfig, ConfigError


class KeyFileError(ConfigError):
    """The CURVE key file is missing, unreadable or malformed (the message never contains the secret)."""

    def __init__(self, why: str) -> None:
        super().__init__("bus.curve_key_file", why)


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes = b""

    def __repr__(self) -> str:  # the secret must never reach a log line
        return f"CurveKeys(public={self.public!r}, secret=<hidden>)"


def generate_key_file(path: str | Path) -> CurveKeys:
    """Write a new cluster key pair to `path`, readable by its owner only."""
    public, secret = zmq.curve_keypair()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(f"public = {public.decode()}\nsecret = {secret.decode()}\n")
    return CurveKeys(public, secret)


def load_key_file(path: str | Path) -> CurveKeys:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the CURVE key file: {exc.strerror}") from None
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip().encode()
    public, secret = values.get("public", b""), values.get("secret", b"")
    if len(public) != 40 or len(secret) != 40:
        raise KeyFileError(f"{path}: expected 'public = <40 z85 chars>' and 'secret = <40 z85 chars>' lines")
    try:
        if zmq.curve_public(secret) != public:
            raise KeyFileError(f"{path}: the public key does not belong to the secret key")
    except zmq.ZMQError:
        raise KeyFileError(f"{path}: the secret key is not valid z85") from None
    return CurveKeys(public, secret)


def cluster_keys(bus: BusConfig) -> CurveKeys | None:
    return load_key_file(bus.curve_key_file) if bus.curve_key_file else None


def secure_client(socket: zmq.Socket[Any], keys: CurveKeys | None) -> None:
    """Make `socket` (before connect) a CURVE client presenting the cluster key pair."""
    if keys is None:
        return
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.public


def secure_server(socket: zmq.Socket[Any], keys: CurveKeys | None) -> None:
    """Make `socket` (before bind) a CURVE server; pair it with `start_authenticator`."""
    if keys is None:
        return
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def start_authenticator(context: zmq.asyncio.Context,
                        keys: CurveKeys | None) -> zmq.auth.asyncio.AsyncioAuthenticator | None:
    """A ZAP handler admitting only clients that present the cluster's public key. Keep it until shutdown."""
    if keys is None:
        return None
    authenticator = zmq.auth.asyncio.AsyncioAuthenticator(context)
    authenticator.start()
    cluster_public = keys.public

    class _OnlyTheClusterKey:
        def callback(self, domain: str, client_key: bytes) -> bool:
            return client_key == cluster_public

    authenticator.configure_curve_callback(domain="*", credentials_provider=_OnlyTheClusterKey())
    return authenticator
