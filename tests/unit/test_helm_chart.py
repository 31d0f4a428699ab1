"""helm/mtacluster: lints clean, renders with default values and every ci/ file, and the result is sound.

Rendering uses helm-python-sdk (Helm's Go SDK, offline). For each rendering: the generated configuration passes
`cluster.config.config_from_dict` (what `mtacluster config check` runs), the shard endpoints follow the
StatefulSet replicas, every container has probes, resources and a non-root, read-only securityContext, and
values.schema.json refuses invalid values.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import config as config_module
from cluster.cli import build_parser
from cluster.config import Config, config_from_dict
from tests.support import REPO
from tests.support.tooling import require_module

helm_python = require_module("helm_python")

CHART = REPO / "helm" / "mtacluster"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE, NAMESPACE = "mail", "mta"
FULLNAME = f"{RELEASE}-mtacluster"
# Config keys the chart sets itself (not accepted under `config` in values).
CHART_OWNED_KEYS = {"smtp": {"listen", "submission_listen", "submissions_listen", "proxy_protocol", "tls_cert_file",
                             "tls_key_file", "shutdown_grace"},
                    "queue": {"shards", "spool_dir"}, "metrics": {"listen", "top_domains"},
                    "bus": {"curve_key_file"}, "auth": {"users_file"},
                    "mailbox": {"maildir_root", "nodes", "lmtp_listen", "pop3_listen", "pop3s_listen", "tls_cert_file",
                                "tls_key_file", "node_ca_file"}}
LINT_WARNING = 2  # helm's support.WarningSev; 1 is INFO ("icon is recommended")


def values_file(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered: dict[str, str] = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
        return rendered


def manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path, text in render(values).items():
        if path.endswith(".txt"):
            continue
        found.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return found


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: found {len(matches)}"
    return matches[0]


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc


def rendered_config(docs: list[dict[str, Any]]) -> Config:
    configmap = named(docs, "ConfigMap", f"{FULLNAME}-config")
    raw = tomllib.loads(configmap["data"]["mtacluster.toml"])
    return config_from_dict(raw, environ={})


VALUE_SETS = [pytest.param({}, id="default")] + [pytest.param(values_file(p), id=p.name) for p in CI_VALUES]


def test_ci_values_exist() -> None:
    assert len(CI_VALUES) >= 2


@pytest.mark.parametrize("values", VALUE_SETS)
def test_chart_lints_clean(values: dict[str, Any]) -> None:
    report = helm_python.lint(str(CHART), values, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= LINT_WARNING] == []


@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_config_passes_config_check_and_lists_one_endpoint_per_shard(values: dict[str, Any]) -> None:
    docs = manifests(values)
    config = rendered_config(docs)
    replicas = named(docs, "StatefulSet", f"{FULLNAME}-queue")["spec"]["replicas"]
    assert replicas == values.get("queue", {}).get("replicas", 1)
    headless = f"{FULLNAME}-queue-headless"
    assert config.queue.shards == tuple(
        f"tcp://{FULLNAME}-queue-{i}.{headless}.{NAMESPACE}.svc:5570" for i in range(replicas))
    assert config.queue.spool_dir == "/var/lib/mtacluster/spool"
    assert config.metrics.listen == "0.0.0.0:9450"
    assert config.bus.curve_key_file == "/etc/mtacluster/keys/curve.key"
    assert config.metrics.top_domains == tuple(values.get("metrics", {}).get("topDomains", []))


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_container_has_probes_resources_and_a_locked_down_security_context(values: dict[str, Any]) -> None:
    docs = manifests(values)
    found = {d["metadata"]["name"] for d in workloads(docs)}
    mailbox = {f"{FULLNAME}-mailbox"} if values.get("mailbox", {}).get("enabled") else set()
    assert found == {f"{FULLNAME}-frontend", f"{FULLNAME}-queue", f"{FULLNAME}-worker", *mailbox}
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, where
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, where
            assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 9450, where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert security["seccompProfile"]["type"] == "RuntimeDefault", where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], where
            assert mounts["/etc/mtacluster/mtacluster.toml"] == "config", where
            assert mounts["/etc/mtacluster/keys"] == "cluster-keys", where


def test_each_role_runs_its_own_serve_command() -> None:
    docs = manifests()
    frontend = named(docs, "Deployment", f"{FULLNAME}-frontend")["spec"]["template"]["spec"]["containers"][0]
    worker = named(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]["containers"][0]
    queue = named(docs, "StatefulSet", f"{FULLNAME}-queue")["spec"]["template"]["spec"]["containers"][0]
    config_args = ["--config", "/etc/mtacluster/mtacluster.toml"]
    assert frontend["args"] == ["serve", "frontend", *config_args]
    assert worker["args"] == ["serve", "worker", *config_args]
    assert queue["command"] == ["sh", "-c"]
    assert queue["args"] == ['exec mtacluster serve queue --config /etc/mtacluster/mtacluster.toml '
                             '--shard "${HOSTNAME##*-}"']


def test_hostname_suffix_is_the_shard_number() -> None:
    # What "${HOSTNAME##*-}" yields for StatefulSet pod names (release names may contain dashes).
    for ordinal in (0, 7, 12):
        hostname = f"{FULLNAME}-queue-{ordinal}"
        assert re.sub(r"^.*-", "", hostname) == str(ordinal)


def test_queue_statefulset_has_a_volume_per_shard_a_pdb_and_graceful_shutdown() -> None:
    docs = manifests({"queue": {"replicas": 3, "persistence": {"size": "20Gi", "storageClass": "fast"}}})
    statefulset = named(docs, "StatefulSet", f"{FULLNAME}-queue")
    spec = statefulset["spec"]
    assert spec["serviceName"] == f"{FULLNAME}-queue-headless"
    [claim] = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    mounts = {m["name"]: m["mountPath"] for m in spec["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["spool"] == "/var/lib/mtacluster/spool"
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    headless = named(docs, "Service", f"{FULLNAME}-queue-headless")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert named(docs, "PodDisruptionBudget", f"{FULLNAME}-queue")["spec"]["maxUnavailable"] == 1


def test_scaling_the_queue_down_drains_the_removed_pods_first() -> None:
    """preStop runs `shard drain N --wait --if-scaled-in` (N from the ordinal) within a grace period to match, with
    a token that may only read the queue StatefulSet; nothing of this when turned off."""
    docs = manifests({"queue": {"replicas": 3, "terminationGracePeriodSeconds": 90,
                                "scaleInDrain": {"enabled": True, "timeoutSeconds": 600}}})
    pod = named(docs, "StatefulSet", f"{FULLNAME}-queue")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"]
    # What the shell runs in pod <fullname>-queue-2, parsed by the real command line parser.
    argv = shlex.split(command[2].replace('"${HOSTNAME##*-}"', "2"))
    assert argv[:2] == ["exec", "mtacluster"]
    args = build_parser().parse_args(argv[2:])
    assert (args.shard_command, args.shard, args.wait) == ("drain", 2, True)
    assert args.if_scaled_in == f"{FULLNAME}-queue" and args.timeout == 600
    assert args.config == "/etc/mtacluster/mtacluster.toml"
    # The drain's wait fits in the grace period, with the shard's own stop after it.
    assert pod["terminationGracePeriodSeconds"] == 600 + 90
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["kube-api-access"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    sources = {v["name"]: v for v in pod["volumes"]}["kube-api-access"]["projected"]["sources"]
    assert {next(iter(source)) for source in sources} == {"serviceAccountToken", "configMap", "downwardAPI"}
    role = named(docs, "Role", f"{FULLNAME}-queue-scale-in")
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["statefulsets"],
                              "resourceNames": [f"{FULLNAME}-queue"], "verbs": ["get"]}]
    binding = named(docs, "RoleBinding", f"{FULLNAME}-queue-scale-in")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    for workload in workloads(docs):  # no other pod gets a token
        if workload["kind"] != "StatefulSet" or workload["metadata"]["name"] != f"{FULLNAME}-queue":
            assert "kube-api-access" not in {v["name"] for v in workload["spec"]["template"]["spec"]["volumes"]}

    off = manifests({"queue": {"terminationGracePeriodSeconds": 90, "scaleInDrain": {"enabled": False}}})
    pod = named(off, "StatefulSet", f"{FULLNAME}-queue")["spec"]["template"]["spec"]
    assert "lifecycle" not in pod["containers"][0] and pod["terminationGracePeriodSeconds"] == 90
    assert not of_kind(off, "Role") and not of_kind(off, "RoleBinding")


def test_frontends_stop_within_a_grace_period_above_their_shutdown_grace() -> None:
    docs = manifests({"frontend": {"shutdownGrace": 25, "terminationGracePeriodSeconds": 40}})
    assert rendered_config(docs).smtp.shutdown_grace == 25
    pod = named(docs, "Deployment", f"{FULLNAME}-frontend")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 25 + 40
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert rendered_config(manifests()).smtp.shutdown_grace > 0  # on by default behind the Service


def test_frontend_service_keeps_client_addresses_and_proxy_protocol_sets_the_config() -> None:
    docs = manifests()
    service = named(docs, "Service", f"{FULLNAME}-smtp")["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"
    assert service["ports"] == [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}]
    assert rendered_config(docs).smtp.proxy_protocol is False
    assert rendered_config(manifests({"frontend": {"service": {"proxyProtocol": True}}})).smtp.proxy_protocol is True


def exposed_ports(docs: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """(Service port by name, container port by name, NetworkPolicy ingress port names) of the frontends."""
    service = named(docs, "Service", f"{FULLNAME}-smtp")
    frontend = named(docs, "Deployment", f"{FULLNAME}-frontend")["spec"]["template"]["spec"]["containers"][0]
    policy = named(docs, "NetworkPolicy", f"{FULLNAME}-frontend")
    ingress = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    return ({p["name"]: p["port"] for p in service["spec"]["ports"]},
            {p["name"]: p["containerPort"] for p in frontend["ports"]}, ingress)


def test_frontends_expose_25_587_and_465_when_tls_is_set() -> None:
    docs = manifests({"tls": {"existingSecret": "certs"}})
    service, container, ingress = exposed_ports(docs)
    assert service == {"smtp": 25, "submission": 587, "submissions": 465}
    assert container == {"smtp": 2525, "submission": 5587, "submissions": 5465, "metrics": 9450}
    assert {"smtp", "submission", "submissions"} <= ingress
    config = rendered_config(docs)
    assert config.smtp.listen == ("0.0.0.0:2525",)
    assert config.smtp.submission_listen == ("0.0.0.0:5587",)
    assert config.smtp.submissions_listen == ("0.0.0.0:5465",)


def test_submission_listeners_need_tls_and_each_listener_can_be_turned_off() -> None:
    service, container, _ = exposed_ports(manifests({}))
    assert service == {"smtp": 25} and set(container) == {"smtp", "metrics"}
    assert rendered_config(manifests({})).smtp.submission_listen == ()
    off = {"tls": {"existingSecret": "certs"},
           "frontend": {"listeners": {"smtp": False, "submission": True, "submissions": False}}}
    docs = manifests(off)
    service, container, ingress = exposed_ports(docs)
    assert service == {"submission": 587} and set(container) == {"submission", "metrics"}
    assert "smtp" not in ingress and "submissions" not in ingress
    config = rendered_config(docs)
    assert config.smtp.listen == () and config.smtp.submissions_listen == ()
    with pytest.raises(helm_python.HelmError, match="turn on at least one listener"):
        render({"frontend": {"listeners": {"smtp": False, "submission": True, "submissions": True}}})


def test_autoscaling_replaces_fixed_replicas() -> None:
    docs = manifests()
    for role in ("frontend", "worker"):
        assert "replicas" not in named(docs, "Deployment", f"{FULLNAME}-{role}")["spec"]
        hpa = named(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-{role}")["spec"]
        assert hpa["scaleTargetRef"]["name"] == f"{FULLNAME}-{role}"
    fixed = manifests({"frontend": {"replicas": 3, "autoscaling": {"enabled": False}},
                       "worker": {"replicas": 5, "autoscaling": {"enabled": False}}})
    assert of_kind(fixed, "HorizontalPodAutoscaler") == []
    assert named(fixed, "Deployment", f"{FULLNAME}-frontend")["spec"]["replicas"] == 3
    assert named(fixed, "Deployment", f"{FULLNAME}-worker")["spec"]["replicas"] == 5


def pod_annotations(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["annotations"] for w in workloads(docs)}


def test_config_checksum_rolls_every_pod_when_the_config_changes() -> None:
    before = pod_annotations(manifests())
    after = pod_annotations(manifests({"config": {"smtp": {"hostname": "mx.changed.example"}}}))
    for name, pod in before.items():
        assert re.fullmatch(r"[0-9a-f]{64}", pod["checksum/config"])
        assert after[name]["checksum/config"] != pod["checksum/config"], name


def test_monitoring_resources_are_gated_on_their_crds_and_values() -> None:
    assert of_kind(manifests(), "ServiceMonitor") == []  # an offline render sees no monitoring.coreos.com API
    assert of_kind(manifests(), "PrometheusRule") == []
    docs = manifests({"monitoring": {"assumeCrdsInstalled": True}})
    monitor = named(docs, "ServiceMonitor", FULLNAME)["spec"]
    metrics_service = named(docs, "Service", f"{FULLNAME}-metrics")
    assert monitor["endpoints"][0]["port"] == "metrics"
    assert monitor["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    rule = named(docs, "PrometheusRule", FULLNAME)["spec"]
    assert rule["groups"] == yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())["groups"]
    off = manifests({"monitoring": {"assumeCrdsInstalled": True, "serviceMonitor": {"enabled": False},
                                    "prometheusRule": {"enabled": False}}})
    assert of_kind(off, "ServiceMonitor") == [] and of_kind(off, "PrometheusRule") == []


def test_dashboard_configmap_carries_the_grafana_dashboard() -> None:
    docs = manifests()
    configmap = named(docs, "ConfigMap", f"{FULLNAME}-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    deployed = json.loads((REPO / "deploy/grafana/mtacluster.json").read_text())
    assert json.loads(configmap["data"]["mtacluster.json"]) == deployed
    assert (CHART / "dashboards/mtacluster.json").read_bytes() == (REPO / "deploy/grafana/mtacluster.json").read_bytes()


def test_secrets_from_values_or_existing_secrets() -> None:
    key_file = "public = " + "a" * 40 + "\nsecret = " + "b" * 40 + "\n"
    docs = manifests({"clusterKeys": {"keyFile": key_file}, "tls": {"certificate": "CERT", "privateKey": "KEY"}})
    assert set(named(docs, "Secret", f"{FULLNAME}-cluster-keys")["data"]) == {"curve.key"}
    assert named(docs, "Secret", f"{FULLNAME}-tls")["type"] == "kubernetes.io/tls"
    frontend = named(docs, "Deployment", f"{FULLNAME}-frontend")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in frontend["volumes"]}["tls"]["secret"]["secretName"] == f"{FULLNAME}-tls"

    existing = manifests({"clusterKeys": {"existingSecret": "keys"}, "tls": {"existingSecret": "certs"}})
    assert of_kind(existing, "Secret") == []
    for workload in workloads(existing):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["cluster-keys"]["secret"]["secretName"] == "keys"
    frontend = named(existing, "Deployment", f"{FULLNAME}-frontend")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in frontend["volumes"]}["tls"]["secret"]["secretName"] == "certs"


def frontend_mounts(docs: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    pod = named(docs, "Deployment", f"{FULLNAME}-frontend")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    return mounts, {v["name"]: v for v in pod["volumes"]}


def test_tls_secret_sets_the_starttls_certificate_in_the_config() -> None:
    plain = rendered_config(manifests())
    assert (plain.smtp.tls_cert_file, plain.smtp.tls_key_file) == ("", "")
    docs = manifests({"tls": {"existingSecret": "certs"}})
    config = rendered_config(docs)
    assert config.smtp.tls_cert_file == "/etc/mtacluster/tls/tls.crt"
    assert config.smtp.tls_key_file == "/etc/mtacluster/tls/tls.key"
    mounts, _ = frontend_mounts(docs)
    assert mounts["/etc/mtacluster/tls"] == "tls"


def test_users_secret_is_mounted_on_frontends_and_mailboxes_only_and_sets_auth_users_file() -> None:
    assert rendered_config(manifests()).auth.users_file == ""
    assert "/etc/mtacluster/users" not in frontend_mounts(manifests())[0]
    users_line = "alice@example.org:scrypt$16384$8$1$c2FsdA==$aGFzaA==\n"
    docs = manifests({"users": {"file": users_line}})
    assert rendered_config(docs).auth.users_file == "/etc/mtacluster/users/users"
    secret = named(docs, "Secret", f"{FULLNAME}-users")
    assert set(secret["data"]) == {"users"}
    mounts, volumes = frontend_mounts(docs)
    assert volumes[mounts["/etc/mtacluster/users"]]["secret"]["secretName"] == f"{FULLNAME}-users"
    for workload in workloads(docs):
        if not workload["metadata"]["name"].endswith("-frontend"):
            pod = workload["spec"]["template"]["spec"]
            assert all(v["name"] != "users" for v in pod["volumes"]), workload["metadata"]["name"]
    with_mailbox = manifests({"users": {"file": users_line}, "tls": {"existingSecret": "t"},
                              "mailbox": {"enabled": True}})
    pod = named(with_mailbox, "StatefulSet", f"{FULLNAME}-mailbox")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert {v["name"]: v for v in pod["volumes"]}[mounts["/etc/mtacluster/users"]]["secret"]["secretName"] == \
        f"{FULLNAME}-users"

    existing = manifests({"users": {"existingSecret": "logins"}})
    assert of_kind(existing, "Secret") == []
    mounts, volumes = frontend_mounts(existing)
    assert volumes[mounts["/etc/mtacluster/users"]]["secret"]["secretName"] == "logins"
    assert rendered_config(existing).auth.users_file == "/etc/mtacluster/users/users"


def test_network_policies_limit_the_bus_to_the_release() -> None:
    docs = manifests()
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(docs, "NetworkPolicy")}
    assert set(policies) == {f"{FULLNAME}-frontend", f"{FULLNAME}-queue", f"{FULLNAME}-worker"}
    bus_rule = next(r for r in policies[f"{FULLNAME}-queue"]["ingress"] if r["ports"][0]["port"] == "bus")
    assert bus_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mtacluster",
                                                                 "app.kubernetes.io/instance": RELEASE}}}]
    assert of_kind(manifests({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


@pytest.mark.parametrize(
    ("values", "complaint"),
    [({"queue": {"replicas": -1}}, "/queue/replicas"),
     ({"queue": {"replicas": 0}}, "/queue/replicas"),
     ({"frontend": {"replicas": "two"}}, "/frontend/replicas"),
     ({"unknownKey": True}, "unknownKey"),
     ({"frontend": {"service": {"type": "Ingress"}}}, "/frontend/service/type"),
     ({"frontend": {"service": {"externalTrafficPolicy": "Nearest"}}}, "externalTrafficPolicy"),
     ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
     ({"metrics": {"port": 70000}}, "/metrics/port"),
     ({"config": {"smtp": {"max_recipent": 5}}}, "max_recipent"),
     ({"config": {"queue": {"shards": ["tcp://elsewhere:5570"]}}}, "shards"),
     ({"config": {"smtp": {"max_recipients": "many"}}}, "/config/smtp/max_recipients"),
     ({"config": {"smtp": {"tls_cert_file": "/x.pem"}}}, "tls_cert_file"),
     ({"config": {"smtp": {"max_auth_failures": 0}}}, "/config/smtp/max_auth_failures"),
     ({"config": {"auth": {"users_file": "/x"}}}, "users_file"),
     ({"users": {"file": 5}}, "/users/file"),
     ({"queue": {"persistence": {"size": "lots"}}}, "/queue/persistence/size"),
     ({"mailbox": {"replicas": 0}}, "/mailbox/replicas"),
     ({"mailbox": {"service": {"type": "Ingress"}}}, "/mailbox/service/type"),
     ({"config": {"mailbox": {"nodes": ["elsewhere:24"]}}}, "nodes"),
     ({"config": {"mailbox": {"quota": True}}}, "/config/mailbox/quota"),
     ({"config": {"smtp": {"shutdown_grace": "5s"}}}, "shutdown_grace"),
     ({"frontend": {"shutdownGrace": -1}}, "/frontend/shutdownGrace"),
     ({"queue": {"scaleInDrain": {"enabled": True, "timeoutSeconds": 0}}}, "/queue/scaleInDrain/timeoutSeconds")],
)
def test_schema_refuses_invalid_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(complaint)):
        render(values)


def test_schema_config_sections_match_config_py() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config_schema = schema["properties"]["config"]["properties"]
    sections = {"smtp": config_module.SmtpConfig, "queue": config_module.QueueConfig,
                "delivery": config_module.DeliveryConfig, "bus": config_module.BusConfig,
                "auth": config_module.AuthConfig, "mailbox": config_module.MailboxConfig}
    for name, cls in sections.items():
        expected = {f.name for f in dataclasses.fields(cls)} - CHART_OWNED_KEYS.get(name, set())
        assert set(config_schema[name]["properties"]) == expected, f"values.schema.json config.{name} is stale"
        assert config_schema[name]["additionalProperties"] is False


def test_every_value_is_documented() -> None:
    """Each key in values.yaml has a `# --` comment, or sits under a key that has one (helm-docs style)."""
    undocumented = []
    documented_indents: list[int] = []  # indentation of the documented ancestors of the current line
    comment_block: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        key = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not key:
            if not stripped:
                comment_block = []
            continue
        indent = len(key.group(1))
        documented_indents = [i for i in documented_indents if i < indent]
        has_doc = any(c.startswith("# --") for c in comment_block)
        is_parent = line.rstrip().endswith(":")
        if has_doc:
            documented_indents.append(indent)
        elif not documented_indents and not is_parent:
            undocumented.append(key.group(2))
        comment_block = []
    assert undocumented == []


def test_chart_has_a_readme_describing_every_component() -> None:
    readme = (CHART / "README.md").read_text()
    for word in ("frontend", "queue", "worker", "ServiceMonitor", "PROXY", "existingSecret", "values.schema.json"):
        assert word in readme


MAILBOX_VALUES = values_file(CHART / "ci" / "mailbox-values.yaml")


def test_mailbox_is_off_by_default_and_needs_a_certificate() -> None:
    docs = manifests()
    assert [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "mailbox"] == []
    assert rendered_config(docs).mailbox.nodes == ("127.0.0.1:2424",)
    with pytest.raises(helm_python.HelmError, match=r"mailbox\.enabled needs a TLS certificate"):
        render({"mailbox": {"enabled": True}})
    # The frontends' certificate serves when the mailbox has none of its own.
    shared = manifests({"mailbox": {"enabled": True}, "tls": {"existingSecret": "mail-tls"}})
    pod = named(shared, "StatefulSet", f"{FULLNAME}-mailbox")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["mailbox-tls"]["secret"]["secretName"] == "mail-tls"


def test_mailbox_statefulset_has_a_volume_per_node_a_pdb_probes_and_graceful_stop() -> None:
    docs = manifests(MAILBOX_VALUES)
    spec = named(docs, "StatefulSet", f"{FULLNAME}-mailbox")["spec"]
    assert spec["replicas"] == 2 and spec["serviceName"] == f"{FULLNAME}-mailbox-headless"
    [claim] = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "maildir" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ['exec mtacluster serve mailbox --config /etc/mtacluster/mtacluster.toml '
                                 '--node "${HOSTNAME##*-}"']
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/var/lib/mtacluster/maildir"] == "maildir"
    assert {v["name"]: v for v in pod["volumes"]}["mailbox-tls"]["secret"]["secretName"] == "mailbox-tls"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] >= 30  # STOP_GRACE of cluster.mailbox.service
    assert named(docs, "PodDisruptionBudget", f"{FULLNAME}-mailbox")["spec"]["maxUnavailable"] == 1

    config = rendered_config(docs)
    headless = f"{FULLNAME}-mailbox-headless"
    assert config.mailbox.nodes == tuple(f"{FULLNAME}-mailbox-{i}.{headless}.{NAMESPACE}.svc:2424" for i in range(2))
    assert config.mailbox.maildir_root == "/var/lib/mtacluster/maildir"
    assert config.mailbox.tls_cert_file == "/etc/mtacluster/mailbox-tls/tls.crt"
    assert config.mailbox.node_ca_file == "/etc/mtacluster/mailbox-tls/ca.crt" and config.mailbox.quota == 2 * 2**30
    assert config.delivery.transports == {"example.org": "local"}
    # Workers check the nodes' certificates: they mount the CA, and only the CA.
    worker = named(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]
    ca = {v["name"]: v for v in worker["volumes"]}["mailbox-ca"]["secret"]
    assert ca["secretName"] == "mailbox-tls" and ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_pop3_service_serves_110_and_995_from_every_node() -> None:
    docs = manifests(MAILBOX_VALUES)
    service = named(docs, "Service", f"{FULLNAME}-pop3")["spec"]
    assert service["type"] == "LoadBalancer" and service["externalTrafficPolicy"] == "Local"
    assert {p["port"]: p["targetPort"] for p in service["ports"]} == {110: "pop3", 995: "pop3s"}
    assert service["selector"]["app.kubernetes.io/component"] == "mailbox"
    assert service["loadBalancerSourceRanges"] == ["198.51.100.0/24"]
    plain = named(manifests({**MAILBOX_VALUES, "mailbox": {"enabled": True}}), "Service", f"{FULLNAME}-pop3")
    assert plain["spec"]["type"] == "ClusterIP" and "externalTrafficPolicy" not in plain["spec"]


def test_only_workers_reach_lmtp() -> None:
    docs = manifests(MAILBOX_VALUES)
    policy = named(docs, "NetworkPolicy", f"{FULLNAME}-mailbox")["spec"]
    lmtp = [rule for rule in policy["ingress"] if any(p["port"] == "lmtp" for p in rule["ports"])]
    assert lmtp == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "mtacluster", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "worker"}}}], "ports": [{"port": "lmtp", "protocol": "TCP"}]}]
    pop3 = [rule for rule in policy["ingress"] if any(p["port"] == "pop3" for p in rule["ports"])]
    assert pop3 and all("from" not in rule for rule in pop3)
