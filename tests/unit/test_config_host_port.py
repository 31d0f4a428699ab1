"""The one "host:port" parser (`cluster.config.split_host_port`) that the configuration and every listener use."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, config_from_dict, split_host_port


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:9450", ("127.0.0.1", 9450)), ("[::1]:9450", ("::1", 9450)), ("localhost:80", ("localhost", 80)),
     (" mx.example:25 ", ("mx.example", 25)), ("host:65535", ("host", 65535))],
)
def test_host_and_port(text: str, parsed: tuple[str, int]) -> None:
    assert split_host_port(text) == parsed


@pytest.mark.parametrize("text", ["", "9450", "host", "host:", "host:65536", "::1:9450", "host:12ab", "host:0"])
def test_malformed_addresses_are_refused_naming_the_key(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        split_host_port(text, key="metrics.listen")
    assert caught.value.key == "metrics.listen"


def test_default_port_and_port_zero_only_when_asked_for() -> None:
    assert split_host_port("smarthost.example", 25) == ("smarthost.example", 25)
    assert split_host_port("0.0.0.0:0", any_port=True) == ("0.0.0.0", 0)
    with pytest.raises(ConfigError, match="out of range 0-65535"):
        split_host_port("host:65536", any_port=True)


@pytest.mark.parametrize("key", ["listen", "submission_listen", "submissions_listen"])
def test_the_configuration_refuses_port_zero_for_every_smtp_listener(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"smtp": {key: ["127.0.0.1:0"]}}, environ={})
    assert caught.value.key == f"smtp.{key}"


def test_the_configuration_refuses_port_zero_for_metrics() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"metrics": {"listen": "127.0.0.1:0"}}, environ={})
    assert caught.value.key == "metrics.listen"
