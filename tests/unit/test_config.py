"""Configuration: defaults, units, environment overrides and clear errors that name the key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from cluster.config import _SECTIONS, ConfigError, config_from_dict, load_config, parse_duration, parse_size
from tests.support import REPO


def test_defaults_are_the_documented_ones() -> None:
    config = load_config(None, environ={})
    assert config.smtp.listen == ("127.0.0.1:2525",)
    assert config.smtp.max_message_size == 25 * 1024 * 1024
    assert config.smtp.max_recipients == 100
    assert config.smtp.max_command_line == 512 and config.smtp.max_text_line == 1000
    assert config.queue.retry_first == 300 and config.queue.retry_max == 4000
    assert config.queue.max_lifetime == 5 * 86400
    assert config.delivery.port == 25 and config.delivery.max_mx_addresses == 5
    assert config.delivery.destination_concurrency == 20
    assert config.up.frontends == 0 and config.up.workers == 0  # scaled to the CPUs (test_supervisor.py)


@pytest.mark.parametrize(("text", "seconds"), [(30, 30), (1.5, 1.5), ("90s", 90), ("5m", 300), ("2h", 7200),
                                               ("5d", 432000), ("250ms", 0.25), ("12", 12)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "k") == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "size"), [(1024, 1024), ("512KiB", 512 * 1024), ("25MiB", 25 * 2**20),
                                            ("1GiB", 2**30), ("10MB", 10**7)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text, "k") == size


def test_file_and_environment_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[smtp]\nhostname = "mx.example"\nmax_message_size = "10MiB"\n'
                    '[queue]\nshards = ["tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001"]\nretry_first = "1m"\n')
    config = load_config(path, environ={"MTACLUSTER_SMTP_HOSTNAME": "mx2.example",
                                        "MTACLUSTER_DELIVERY_PORT": "2525",
                                        "MTACLUSTER_SMTP_LISTEN": '["0.0.0.0:25", "[::]:25"]'})
    assert config.smtp.hostname == "mx2.example"
    assert config.smtp.max_message_size == 10 * 2**20
    assert config.smtp.listen == ("0.0.0.0:25", "[::]:25")
    assert len(config.queue.shards) == 2 and config.queue.retry_first == 60
    assert config.delivery.port == 2525


@pytest.mark.parametrize(("raw", "key"), [
    ({"smtp": {"max_recipients": "many"}}, "smtp.max_recipients"),
    ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients"),
    ({"smtp": {"listen": ["nohost"]}}, "smtp.listen"),
    ({"smtp": {"relay_networks": ["10.0.0.0/33"]}}, "smtp.relay_networks"),
    ({"smtp": {"colour": "blue"}}, "smtp.colour"),
    ({"smpt": {}}, "smpt"),
    ({"queue": {"shards": []}}, "queue.shards"),
    ({"queue": {"shards": ["http://x:1"]}}, "queue.shards"),
    ({"queue": {"retry_first": "soon"}}, "queue.retry_first"),
    ({"queue": {"retry_first": "10m", "retry_max": "1m"}}, "queue.retry_max"),
    ({"delivery": {"port": 70000}}, "delivery.port"),
    ({"delivery": {"tls": "maybe"}}, "delivery.tls"),
    ({"delivery": {"transports": {"example.com": "carrier-pigeon"}}}, "delivery.transports.example.com"),
    ({"smtp": {"max_message_size": "1KiB"}}, "smtp.max_message_size"),
    ({"smtp": {"shutdown_grace": "-1s"}}, "smtp.shutdown_grace"),
    ({"smtp": {"shutdown_grace": "2h"}}, "smtp.shutdown_grace"),
    ({"smtp": {"shutdown_grace": "soon"}}, "smtp.shutdown_grace"),
    ({"up": {"frontends": -1}}, "up.frontends"),
    ({"up": {"workers": -2}}, "up.workers"),
])
def test_bad_values_name_the_key(raw: dict[str, dict[str, object]], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, environ={})
    assert info.value.key == key
    assert info.value.why


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})


def test_transports_accept_every_documented_form() -> None:
    config = config_from_dict({"delivery": {"transports": {
        "a.test": "smtp:[127.0.0.9]:2525", ".b.test": "smtp:relay.b.test", "local.test": "local",
        "c.test": "error:5.1.1 no such domain here"}}}, environ={})
    assert config.delivery.transports["a.test"] == "smtp:[127.0.0.9]:2525"


def readme_reference() -> dict[str, dict[str, str]]:
    """{section: {key: default as written}} from the README's "Configuration reference" tables.

    A row may name several keys (`a`, `b` / `c`) with one default for all or one default each, in order.
    """
    readme = (REPO / "README.md").read_text()
    reference = readme.split("\n## Configuration reference\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, dict[str, str]] = {}
    section = ""
    for line in reference.splitlines():
        if heading := re.match(r"### `\[(\w+)\]`", line):
            section = heading.group(1)
            assert section not in documented, f"[{section}] has two tables in the README"
            documented[section] = {}
        elif line.startswith("| `") and section:
            key_cell, default_cell = line.split(" | ")[:2]
            keys, defaults = re.findall(r"`(\w+)`", key_cell), re.findall(r"`([^`]*)`", default_cell)
            assert len(defaults) in (1, len(keys)), f"README row with keys {keys}: defaults {defaults} do not match"
            for key, default in zip(keys, defaults * len(keys) if len(defaults) == 1 else defaults, strict=True):
                assert key not in documented[section], f"{section}.{key} is documented twice"
                documented[section][key] = default
    return documented


def test_readme_documents_every_key_and_no_other() -> None:
    documented = readme_reference()
    assert sorted(documented) == sorted(_SECTIONS), "README sections differ from cluster.config's"
    for section, cls in _SECTIONS.items():
        keys = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(keys - documented[section].keys()), sorted(documented[section].keys() - keys)
        assert not missing, f"[{section}] keys missing from the README's configuration reference: {missing}"
        assert not unknown, f"[{section}] keys in the README that cluster.config does not have: {unknown}"


def test_readme_defaults_are_the_built_in_ones() -> None:
    built_in = load_config(None, environ={})
    for section, keys in readme_reference().items():
        for key, text in keys.items():
            value = tomllib.loads(f"v = {text}")["v"]
            written = getattr(getattr(config_from_dict({section: {key: value}}, environ={}), section), key)
            assert written == getattr(getattr(built_in, section), key), f"README default of {section}.{key}: {text}"


def test_readme_documents_every_key_of_nested_tables() -> None:
    from cluster.config import DkimDomain, EgressSource, PoolMember

    readme = (REPO / "README.md").read_text()
    for prefix, cls in (("domains.D.", DkimDomain), ("sources.NAME.", EgressSource)):
        for f in dataclasses.fields(cls):
            assert f"`{prefix}{f.name}`" in readme, f"{prefix}{f.name} is not in the README"
    assert '{ source = "name", weight = N }' in readme
    assert {f.name for f in dataclasses.fields(PoolMember)} == {"source", "weight"}
