"""deploy/grafana/mtacluster.json: a well-formed Grafana dashboard over metrics the code really exports.

Checks the structure (datasource and pod variables, a repeated per-pod row, unique panel ids, every panel bound
to the datasource variable), that every query uses only exported metric names and parses as PromQL (promtool
checks them as recording rules once Grafana's variables are substituted), and that the Helm chart ships an
identical copy. tests/integration/test_prometheus_live.py runs the same queries against a live Prometheus.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO
from tests.support.promql_names import exported_series_names, referenced_metric_names
from tests.support.tooling import require_tool

DASHBOARD = REPO / "deploy" / "grafana" / "mtacluster.json"
CHART_DASHBOARD = REPO / "helm" / "mtacluster" / "dashboards" / "mtacluster.json"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


# What Grafana puts in place of its variables before a query reaches Prometheus ("All" is ".*").
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$namespace": ".*", "$pod": ".*"}


def substitute_variables(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_has_datasource_namespace_and_pod_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_dashboard_repeats_a_row_per_pod() -> None:
    rows = [p for p in dashboard()["panels"] if p["type"] == "row"]
    assert [r for r in rows if r.get("repeat") == "pod"]


def test_panel_ids_are_unique_and_every_panel_uses_the_datasource_variable() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in query_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_panels_the_issue_asks_for_exist() -> None:
    exprs = " ".join(t["expr"] for p in query_panels() for t in p["targets"])
    for metric in ("mtacluster_smtp_messages_accepted_total", "mtacluster_delivery_attempts_total",
                   "mtacluster_smtp_accept_latency_seconds_bucket", "mtacluster_queue_messages",
                   "mtacluster_queue_oldest_message_age_seconds", "mtacluster_delivery_status_total",
                   "mtacluster_delivery_dns_lookups_total", "mtacluster_delivery_connection_cache_total"):
        assert metric in exprs
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_security_and_pop3_row_shows_auth_tls_and_pop3() -> None:
    panels = dashboard()["panels"]
    row = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Security and POP3")
    following = next((i for i, p in enumerate(panels) if i > row and p["type"] == "row"), len(panels))
    exprs = " ".join(t["expr"] for p in panels[row + 1:following] for t in p["targets"])
    for metric in ("mtacluster_smtp_auth_total", "mtacluster_smtp_tls_handshakes_total",
                   "mtacluster_pop3_connections_current", "mtacluster_pop3_logins_total",
                   "mtacluster_pop3_messages_retrieved_total", "mtacluster_pop3_messages_deleted_total"):
        assert metric in exprs, metric
    assert "sum by (result) (rate(mtacluster_smtp_auth_total" in exprs


def test_mailbox_row_shows_lmtp_outcomes_mailbox_sizes_and_pop3_sessions() -> None:
    panels = dashboard()["panels"]
    row = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"].startswith("Mailbox"))
    following = next((i for i, p in enumerate(panels) if i > row and p["type"] == "row"), len(panels))
    exprs = " ".join(t["expr"] for p in panels[row + 1:following] for t in p["targets"])
    for metric in ("mtacluster_lmtp_deliveries_total", "mtacluster_delivery_lmtp_total",
                   "mtacluster_mailbox_size_bytes_bucket", "mtacluster_mailbox_quota_usage_ratio_bucket",
                   "mtacluster_pop3_sessions_total", "mtacluster_lmtp_connections_current"):
        assert metric in exprs, metric
    assert "sum by (outcome) (rate(mtacluster_lmtp_deliveries_total" in exprs


def test_every_query_filters_by_pod_and_uses_only_exported_metrics() -> None:
    exported = exported_series_names()
    for panel in query_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'pod=~"$pod"' in expr, f"{panel['title']}: {expr}"
            unknown = referenced_metric_names(expr) - exported
            assert not unknown, f"{panel['title']} uses metrics no module exports: {sorted(unknown)}"


def test_chart_ships_the_same_dashboard() -> None:
    assert CHART_DASHBOARD.read_bytes() == DASHBOARD.read_bytes(), "copy deploy/grafana/mtacluster.json into the chart"


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    exprs = [substitute_variables(t["expr"]) for p in query_panels() for t in p["targets"]]
    assert not [e for e in exprs if "$" in e], "a Grafana variable the test does not know"
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    check = subprocess.run([promtool, "check", "rules", "dashboard_rules.yml"], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_frontend_traffic_is_shown_by_listener() -> None:
    from cluster.frontend import metrics

    exprs = [t["expr"] for p in query_panels() for t in p.get("targets", [])]
    for metric in ("mtacluster_smtp_messages_accepted_total", "mtacluster_smtp_connections_total",
                   "mtacluster_smtp_messages_rejected_total"):
        assert any("by (listener" in e and metric in e for e in exprs), metric
    for counter in (metrics.MESSAGES_ACCEPTED, metrics.CONNECTIONS, metrics.MESSAGES_REJECTED):
        assert "listener" in counter._labelnames
