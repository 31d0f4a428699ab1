"""Pure arithmetic for benchmark figures: percentiles, rates and ratios.

Inputs are plain numbers (latencies in seconds, counts, wall times); outputs are floats or None when a figure
cannot be computed (no samples, a zero duration, a missing side of a ratio). Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(samples: Sequence[float], fraction: float) -> float | None:
    """The `fraction` quantile (0..1) of `samples`, linearly interpolated between closest ranks.

    Same definition as numpy's default ("linear"): rank = fraction * (n - 1). None for no samples.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, got {fraction!r}")
    if not samples:
        return None
    ordered = sorted(samples)
    rank = fraction * (len(ordered) - 1)
    lower = math.floor(rank)
    upper = min(lower + 1, len(ordered) - 1)
    weight = rank - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * weight


@dataclass(frozen=True)
class LatencySummary:
    """Accept latency (end of DATA -> 250) in milliseconds."""

    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def summarize_latencies(seconds: Sequence[float]) -> LatencySummary:
    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000.0

    return LatencySummary(
        count=len(seconds),
        p50_ms=ms(percentile(seconds, 0.50)),
        p90_ms=ms(percentile(seconds, 0.90)),
        p99_ms=ms(percentile(seconds, 0.99)),
        max_ms=ms(max(seconds)) if seconds else None,
    )


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 0.5)


def rate(count: int, seconds: float | None) -> float | None:
    """Events per second; None when the duration is unknown or not positive."""
    if seconds is None or seconds <= 0:
        return None
    return count / seconds


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs; None when either side is missing or theirs is zero."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs
