"""Reads the asset checks share: the day's deduplicated archive and the written report."""

from __future__ import annotations

from typing import Any

import polars as pl

from kappa_dagster.replay.target import ReplayTarget
from workers.archive import format as archive_format
from workers.config import Settings


def archive_day(client: Any, settings: Settings, target: ReplayTarget) -> pl.DataFrame:
    """Every record of the day once (dedup by topic, partition, offset), straight from the archive."""
    return archive_format.read_day(client, settings.s3_bucket, settings.events_topic, target.day)


def mismatches(report: pl.DataFrame, expected: pl.DataFrame, key: list[str]) -> pl.DataFrame:
    """Rows present on one side only or with different values (exact: amounts are summed as decimals)."""
    joined = report.join(expected, on=key, how="full", coalesce=True, suffix="_expected")
    value_columns = [c for c in report.columns if c not in key]
    differs = pl.any_horizontal(
        [pl.col(c).ne_missing(pl.col(f"{c}_expected")) for c in value_columns] or [pl.lit(False)]
    )
    return joined.filter(differs).sort(key)
