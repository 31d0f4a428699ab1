"""deploy/: the example configurations pass the configuration check (also with their commented-out optional
settings uncommented), and the Dockerfile is built the way ARCHITECTURE.md and the chart expect (one image for every
role, non-root, no secrets baked in).

There is no Docker engine in CI, so the Dockerfile is checked statically.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.config import load_config
from tests.support import REPO

DEPLOY = REPO / "deploy"
EXAMPLES = sorted((DEPLOY / "examples").glob("*.toml"))


def test_there_are_single_host_and_kubernetes_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"single-host.toml", "kubernetes.toml"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_configuration_passes_the_check(example: Path) -> None:
    config = load_config(example, environ={})
    assert config.metrics.listen
    assert config.deprecations == ()


# A commented-out setting: "# key = value", the key in lower case (prose comments start otherwise).
COMMENTED_SETTING = re.compile(r"^# ([a-z_][a-z0-9_]* = .+)$", re.MULTILINE)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_commented_settings_are_valid_when_uncommented(example: Path, tmp_path: Path) -> None:
    text = example.read_text()
    assert COMMENTED_SETTING.search(text), "the example shows no optional settings"
    uncommented = tmp_path / example.name
    uncommented.write_text(COMMENTED_SETTING.sub(r"\1", text))
    config = load_config(uncommented, environ={})
    assert config.auth.users_file and config.smtp.tls_cert_file and config.mailbox.tls_cert_file


def test_kubernetes_example_encrypts_the_bus_and_listens_on_every_interface() -> None:
    config = load_config(DEPLOY / "examples" / "kubernetes.toml", environ={})
    assert config.bus.curve_key_file
    assert config.metrics.listen.startswith("0.0.0.0:")
    assert all(address.startswith("0.0.0.0:") for address in config.smtp.listen)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    found = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_dockerfile_is_a_multi_stage_build_on_python_slim() -> None:
    stages = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert len(stages) >= 2
    assert all(stage.startswith("python:3.11-slim") for stage in stages)


def test_dockerfile_runs_every_role_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["mtacluster"]') in instructions
    assert ("CMD", '["serve", "frontend", "--config", "/etc/mtacluster/mtacluster.toml"]') in instructions


def test_dockerfile_bakes_in_no_secrets() -> None:
    text = (DEPLOY / "Dockerfile").read_text().lower()
    for word in ("curve.key", "secret", "password", "private key", "tls.key", "token"):
        assert word not in text, word
    copied = [rest for word, rest in dockerfile_instructions() if word in ("COPY", "ADD")]
    assert not [c for c in copied if re.search(r"\.(key|pem|crt)\b", c)]
