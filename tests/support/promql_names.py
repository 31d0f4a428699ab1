"""Metric names for tests of the dashboard and alert rules: what the code exports, and what PromQL refers to.

`exported_series_names()` imports every subsystem's metrics module and lists the series names prometheus_client
exposes for them (counters as `<name>_total`, histograms as `_bucket`, `_sum`, `_count`), plus the process
collector's. `referenced_metric_names(expr)` finds the `mtacluster_*` and `process_*` names a PromQL expression uses.
"""

from __future__ import annotations

import importlib
import re

from prometheus_client import REGISTRY

METRICS_MODULES = ("cluster.observability", "cluster.frontend.metrics", "cluster.queue.metrics",
                   "cluster.delivery.metrics", "cluster.mailbox.metrics", "cluster.dkim.metrics")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""),
             "gauge": ("",), "info": ("_info",)}
_NAME = re.compile(r"\b((?:mtacluster|process)_[a-z0-9_]+)\b")


def exported_series_names() -> set[str]:
    for module in METRICS_MODULES:
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def referenced_metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))
