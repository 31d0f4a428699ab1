"""The frontend's pending counts (cluster/frontend/metrics.py `count`): kept as plain numbers, in the series when
the registry is read."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest

from cluster import observability
from cluster.frontend import metrics


def _connections(listener: str) -> float:
    return REGISTRY.get_sample_value("mtacluster_smtp_connections_total", {"listener": listener}) or 0.0


def test_a_count_is_in_its_series_as_soon_as_the_registry_is_read() -> None:
    before = _connections("submission")
    metrics.count(metrics.connections("submission"), 3)
    metrics.count(metrics.connections("submission"))
    assert observability.PENDING.amounts  # not added yet: no lock taken per count
    assert _connections("submission") == before + 4
    assert not observability.PENDING.amounts


def test_a_scrape_sees_the_counts_and_a_gauge_goes_down_too() -> None:
    metrics.count(metrics.CONNECTIONS_CURRENT)
    metrics.count(metrics.CONNECTIONS_CURRENT)
    metrics.count(metrics.CONNECTIONS_CURRENT, -1.0)
    before = REGISTRY.get_sample_value("mtacluster_smtp_connections_current") or 0.0
    metrics.count(metrics.CONNECTIONS_CURRENT, 2)
    text = generate_latest().decode()
    assert f"mtacluster_smtp_connections_current {before + 2}" in text
    metrics.count(metrics.CONNECTIONS_CURRENT, -3)
    assert REGISTRY.get_sample_value("mtacluster_smtp_connections_current") == before - 1


def _commands(verb: str) -> float:
    return REGISTRY.get_sample_value("mtacluster_smtp_commands_total", {"command": verb}) or 0.0


def _replies(kind: str) -> float:
    return REGISTRY.get_sample_value("mtacluster_smtp_replies_total", {"class": kind}) or 0.0


def test_commands_and_replies_are_tallied_per_verb_and_code_and_in_their_series_when_read() -> None:
    before = {"RCPT": _commands("RCPT"), "other": _commands("other"), "2xx": _replies("2xx"), "5xx": _replies("5xx")}
    for verb in ("RCPT", "RCPT", "XYZZY"):
        metrics.count_command(verb)
    for code in (250, 250, 221, 550):
        metrics.count_reply(code)
    assert metrics.TALLIES.commands == {"RCPT": 2, "XYZZY": 1}  # no series touched yet
    assert _commands("RCPT") == before["RCPT"] + 2
    assert _commands("other") == before["other"] + 1  # a verb outside COMMAND_NAMES
    assert _replies("2xx") == before["2xx"] + 3
    assert _replies("5xx") == before["5xx"] + 1
    assert not metrics.TALLIES.commands and not metrics.TALLIES.replies
