"""deploy/prometheus/alerts.yml: promtool checks it, its unit tests pass, every alert is tested both ways.

Also: every metric an alert uses is one the code exports, and the Helm chart's copy of the rules is identical.
"""

from __future__ import annotations

import subprocess
from typing import Any

import yaml

from tests.support import REPO
from tests.support.promql_names import exported_series_names, referenced_metric_names
from tests.support.tooling import require_tool

RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"
CHART_RULES = REPO / "helm" / "mtacluster" / "rules" / "alerts.yml"


def alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent)


def test_promtool_check_rules_passes() -> None:
    check = run_promtool("check", "rules", RULES.name)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in check.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_the_issue_asks_for_exist() -> None:
    names = {rule["alert"] for rule in alerts()}
    assert {"MtaclusterQueueGrowing", "MtaclusterOldestMessageTooOld", "MtaclusterBounceRateHigh",
            "MtaclusterShardDown", "MtaclusterNoDeliveries", "MtaclusterDiskAlmostFull",
            "MtaclusterAuthFailureSurge", "MtaclusterLmtpFailures"} <= names


def test_every_alert_has_a_firing_and_a_not_firing_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts without a test where they fire"
    assert names - quiet == set(), "alerts without a test where they stay quiet"


def test_every_alert_has_severity_summary_and_runbook_section() -> None:
    operations = (REPO / "deploy" / "OPERATIONS.md").read_text()
    for rule in alerts():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        assert runbook.startswith("deploy/OPERATIONS.md#"), rule["alert"]
        anchor = runbook.split("#", 1)[1]
        headings = {line.lstrip("#").strip().lower().replace(" ", "-")
                    for line in operations.splitlines() if line.startswith("#")}
        assert anchor in headings, f"{rule['alert']}: OPERATIONS.md has no section #{anchor}"


def test_alerts_use_only_metrics_the_code_exports() -> None:
    exported = exported_series_names()
    for rule in alerts():
        unknown = referenced_metric_names(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']} uses metrics no module exports: {sorted(unknown)}"


def test_chart_ships_the_same_rules() -> None:
    assert CHART_RULES.read_bytes() == RULES.read_bytes(), "copy deploy/prometheus/alerts.yml into the chart"
