"""The one reader of what the processor writes: live results and corrected reports of a version and day.

The CLI, the dashboard, Dagster and the tests read through here, so they all see the same rows. The
SQL reference (``workers/reports/reference.py``) keeps its own reader on purpose: an oracle shares
no code with what it checks.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from workers import keys
from workers import s3 as s3_helpers
from workers.pipelines import get_pipeline
from workers.processor.state import results_for_day


@dataclass(frozen=True)
class CorrectedReport:
    """``reports/<P>/v<V>/dt=<D>/report.parquet`` and the counters of its ``stats.json``."""

    frame: pl.DataFrame
    stats: dict[str, Any]


def live_results(
    client: Any, bucket: str, pipeline: str, version: int, day: str, include_open: bool = False
) -> pl.DataFrame:
    """Live output rows of one day (closed windows; ``include_open`` adds the provisional open ones)."""
    impl = get_pipeline(pipeline, version)
    prefix = keys.processor_prefix(pipeline, version, None)
    return results_for_day(client, bucket, prefix, impl, keys.valid_day(day), include_open)


def corrected_report(client: Any, bucket: str, pipeline: str, version: int, day: str) -> CorrectedReport | None:
    """The corrected report of a version and day, None until the replay wrote it (report and stats)."""
    body = s3_helpers.get_bytes(client, bucket, keys.report_file(pipeline, version, day))
    stats = s3_helpers.get_bytes(client, bucket, keys.report_stats_file(pipeline, version, day))
    if body is None or stats is None:
        return None
    return CorrectedReport(pl.read_parquet(io.BytesIO(body)), json.loads(stats))
