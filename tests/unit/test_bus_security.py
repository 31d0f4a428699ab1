"""CURVE on the bus: key files, and that only holders of the cluster key pair get through."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from cluster.bus.security import (
    KeyFileError,
    generate_key_file,
    load_key_file,
    secure_client,
    secure_server,
    start_authenticator,
)
from cluster.config import ConfigError, config_from_dict
from tests.support.tooling import free_port


def test_key_file_round_trip_and_secret_never_in_repr(tmp_path: Path) -> None:
    keys = generate_key_file(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    assert load_key_file(tmp_path / "k") == keys
    assert keys.secret.decode() not in repr(keys)


@pytest.mark.parametrize("text", ["", "public = abc\nsecret = def\n", "garbage"])
def test_bad_key_files(tmp_path: Path, text: str) -> None:
    (tmp_path / "k").write_text(text)
    with pytest.raises(KeyFileError):
        load_key_file(tmp_path / "k")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key_file(tmp_path / "missing")


def test_off_host_shards_require_a_key_file() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"queue": {"shards": ["tcp://mta-queue-0.mta-queue:5570"]}}, environ={})
    assert info.value.key == "bus.curve_key_file"
    config_from_dict({"queue": {"shards": ["tcp://[::1]:5570", "ipc:///tmp/x", "tcp://localhost:1"]}}, environ={})
    config_from_dict({"queue": {"shards": ["tcp://10.0.0.1:5570"]}, "bus": {"curve_key_file": "/k"}}, environ={})


async def test_only_the_cluster_key_gets_through(tmp_path: Path) -> None:
    keys = generate_key_file(tmp_path / "cluster")
    stranger = generate_key_file(tmp_path / "stranger")
    context = zmq.asyncio.Context()
    authenticator = start_authenticator(context, keys)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = context.socket(zmq.ROUTER)
    secure_server(server, keys)
    server.bind(endpoint)
    try:
        good = context.socket(zmq.DEALER)
        secure_client(good, keys)
        good.connect(endpoint)
        await good.send(b"hello")
        _, frame = await asyncio.wait_for(server.recv_multipart(), 5)
        assert frame == b"hello"

        bad = context.socket(zmq.DEALER)
        bad.curve_secretkey, bad.curve_publickey, bad.curve_serverkey = stranger.secret, stranger.public, keys.public
        bad.connect(endpoint)
        await bad.send(b"intruder")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(server.recv_multipart(), 1)
        for s in (good, bad):
            s.close(linger=0)
    finally:
        server.close(linger=0)
        assert authenticator is not None
        authenticator.stop()
        context.term()
