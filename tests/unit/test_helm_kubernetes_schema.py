"""Every object the chart renders is valid Kubernetes, for every Kubernetes version the chart claims to support.

`kubernetes-validate` ships the OpenAPI schemas of each Kubernetes release; Chart.yaml's `kubeVersion` says
which releases the chart supports. Each value set (defaults and every ci/ file, with the monitoring CRDs
assumed present so their templates render too) is rendered by helm-python-sdk, and each object is validated in
strict mode (unknown fields are errors) against each supported release. The Prometheus Operator kinds are not
part of the Kubernetes API: they are checked to be exactly those, and nothing else is let through.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import pytest
import yaml

from tests.support.tooling import require_module
from tests.unit.test_helm_chart import CHART, VALUE_SETS, manifests, render

kubernetes_validate = require_module("kubernetes_validate")
validate_utils = require_module("kubernetes_validate.utils")

# Objects of custom resource definitions, validated by their operator rather than the Kubernetes API schema.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def supported_versions() -> list[str]:
    """The Kubernetes releases known to kubernetes-validate that satisfy Chart.yaml's kubeVersion (">=X.Y")."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)\.\d+(-0)?", constraint)
    assert m, f"kubeVersion {constraint!r}: only a lower bound is understood here"
    minimum = (int(m.group(1)), int(m.group(2)))
    known = sorted({tuple(int(x) for x in v.split(".")[:2]) for v in validate_utils.all_versions()})
    assert known[0] <= minimum, f"kubernetes-validate has no schemas as old as the chart's {minimum}"
    return [f"{major}.{minor}.0" for major, minor in known if (major, minor) >= minimum]


@pytest.fixture(scope="module", autouse=True)
def cached_schemas() -> Any:
    """Each schema file is read once (kubernetes-validate reads it again for every object otherwise)."""
    original = validate_utils.schema_contents
    validate_utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    validate_utils.schema_contents = original


# Secrets made by the chart from inline values (the ci/ files use existing Secrets): rendered here so that
# their templates are validated too.
INLINE_SECRETS = {"clusterKeys": {"keyFile": "public = x\nsecret = y\n"},
                  "tls": {"certificate": "-----BEGIN CERTIFICATE-----\n", "privateKey": "-----BEGIN KEY-----\n"},
                  "users": {"file": "alice@example.org:scrypt$16384$8$1$c2FsdA==$aGFzaA==\n"},
                  "mailbox": {"enabled": True}}
ALL_VALUE_SETS = [*VALUE_SETS, pytest.param(INLINE_SECRETS, id="inline-secrets")]


def with_crds(values: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(values)
    merged.setdefault("monitoring", {})["assumeCrdsInstalled"] = True
    return merged


def test_supported_versions_cover_the_range_and_every_template_renders_somewhere() -> None:
    versions = supported_versions()
    assert versions[0] == "1.25.0" and len(versions) >= 10
    rendered = {path.removeprefix("mtacluster/templates/") for values in ALL_VALUE_SETS
                for path, text in render(with_crds(values.values[0])).items()
                if path.endswith(".yaml") and any(yaml.safe_load_all(text))}
    templates = {str(p.relative_to(CHART / "templates")) for p in (CHART / "templates").rglob("*.yaml")}
    assert templates - rendered == set(), "templates that render in no value set (so are never validated)"


@pytest.mark.parametrize("values", ALL_VALUE_SETS)
def test_every_rendered_object_is_valid_for_every_supported_version(values: dict[str, Any]) -> None:
    docs = manifests(with_crds(values))
    problems = []
    for version in supported_versions():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {exc}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{version} {doc['kind']} ({doc['apiVersion']}): not a Kubernetes kind")
    assert problems == []


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check above is worth something: a misspelled field and a wrong type are caught."""
    docs = manifests()
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    misspelled = copy.deepcopy(deployment)
    misspelled["spec"]["replica"] = 2
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "smtp"
    for broken in (misspelled, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, supported_versions()[0], strict=True)
