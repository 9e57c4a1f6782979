"""Compare two reports window by window: what the corrected report changes against the live one."""

from __future__ import annotations

from typing import Any

import polars as pl

KEY = ["window_start", "type"]


def diff(corrected: pl.DataFrame, live: pl.DataFrame) -> pl.DataFrame:
    """Rows whose events or amount differ (missing on one side counts as 0), with the deltas."""
    joined = corrected.join(live, on=KEY, how="full", coalesce=True, suffix="_live").with_columns(
        pl.col("events").fill_null(0),
        pl.col("events_live").fill_null(0),
        pl.col("amount").fill_null(0.0),
        pl.col("amount_live").fill_null(0.0),
    )
    return (
        joined.with_columns(
            (pl.col("events") - pl.col("events_live")).alias("events_delta"),
            (pl.col("amount") - pl.col("amount_live")).alias("amount_delta"),
        )
        .filter((pl.col("events_delta") != 0) | (pl.col("amount_delta").abs() > 1e-9))
        .sort(KEY)
    )


def summary(corrected: pl.DataFrame, live: pl.DataFrame) -> dict[str, Any]:
    """Counts for metadata: windows changed and by how much in total."""
    changed = diff(corrected, live)
    return {
        "windows_compared": corrected.join(live, on=KEY, how="full").height,
        "windows_changed": changed.height,
        "events_delta": int(changed["events_delta"].sum()),
        "amount_delta": round(float(changed["amount_delta"].sum()), 6),
        "changed": changed,
    }


def markdown(frame: pl.DataFrame, limit: int = 10) -> str:
    """A small Markdown table (the Dagster UI renders it)."""
    if frame.is_empty():
        return "_no rows_"
    head = frame.head(limit)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in head.iter_rows()]
    if frame.height > limit:
        lines.append(f"\n_{frame.height - limit} more rows_")
    return "\n".join(lines)
