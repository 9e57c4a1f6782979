"""Median and spread of repeated measurements."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summary(values: Sequence[float]) -> dict[str, float | int | list[float]]:
    """``median``, ``min``, ``max``, ``spread`` ((max - min) / median) and the raw ``values``."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "values": []}
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {
        "n": len(values),
        "median": median,
        "min": low,
        "max": high,
        "spread": (high - low) / median if median else 0.0,
        "values": values,
    }


def ratios(ours: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Pairwise ratios of runs measured side by side (run i of ours / run i of the reference)."""
    return [a / b for a, b in zip(ours, reference, strict=True) if b > 0]
