"""A few figures from the cluster's own /metrics after a run: group-commit batch size, leases taken back, and the
mean time a frontend spent signing one message (DKIM, the signed scenario).

`scrape(host, port)` fetches one process's Prometheus text exposition; `sum_by_name(text)` is pure and sums
every sample of each metric name over its labels. `shard_summary(values)` picks the figures the benchmark
reports. A process that does not answer gives an empty summary, never an error: these figures are extras.
"""

from __future__ import annotations

import urllib.error
import urllib.request

SCRAPE_TIMEOUT = 3.0
_COMMIT_BATCH = "mtacluster_queue_spool_commit_batch_messages"
_COMMIT_DURATION = "mtacluster_queue_spool_commit_duration_seconds"
_LEASES_EXPIRED = "mtacluster_queue_leases_expired_total"
_STORED = "mtacluster_queue_messages_stored_total"
_SIGN_DURATION = "mtacluster_dkim_sign_duration_seconds"


def sum_by_name(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, value_text = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0]
        try:
            value = float(value_text)
        except ValueError:
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


def scrape(host: str, port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=SCRAPE_TIMEOUT) as response:
            body: bytes = response.read()
    except (urllib.error.URLError, OSError):
        return ""
    return body.decode(errors="replace")


def shard_summary(values: dict[str, float]) -> dict[str, float]:
    """Commits that stored new mail and the messages each stored, every spool transaction (stores, marks,
    outcomes, deletes) with its mean milliseconds and how many there were per stored message, leases taken
    back, messages stored."""
    summary: dict[str, float] = {}
    commits = values.get(f"{_COMMIT_BATCH}_count", 0.0)
    if commits:
        summary["spool_commits"] = commits
        summary["messages_per_commit"] = values.get(f"{_COMMIT_BATCH}_sum", 0.0) / commits
    transactions = values.get(f"{_COMMIT_DURATION}_count", 0.0)
    if transactions:
        summary["spool_transactions"] = transactions
        summary["commit_ms_mean"] = 1000.0 * values.get(f"{_COMMIT_DURATION}_sum", 0.0) / transactions
    for key, name in (("leases_expired", _LEASES_EXPIRED), ("messages_stored", _STORED)):
        if name in values:
            summary[key] = values[name]
    if transactions and summary.get("messages_stored"):
        summary["transactions_per_message"] = transactions / summary["messages_stored"]
    return summary


def signing_summary(values: dict[str, float]) -> dict[str, float]:
    """Messages signed and the mean milliseconds of one `DkimSigner.sign` (wall time inside the frontend:
    canonicalization, hashes and the private-key operation), from the frontends' metrics summed."""
    signed = values.get(f"{_SIGN_DURATION}_count", 0.0)
    if not signed:
        return {}
    return {"signed": signed, "sign_ms_mean": 1000.0 * values.get(f"{_SIGN_DURATION}_sum", 0.0) / signed}
