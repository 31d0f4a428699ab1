"""Trace ids (cluster/frontend/session.py new_trace_id): made in batches, each still 80 random bits."""

from __future__ import annotations

from cluster.frontend.session import new_trace_id


def test_trace_ids_are_distinct_lower_case_base32_of_16_characters_across_batches() -> None:
    ids = [new_trace_id() for _ in range(1000)]  # several batches of 128
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and set(i) <= set("abcdefghijklmnopqrstuvwxyz234567") for i in ids)
