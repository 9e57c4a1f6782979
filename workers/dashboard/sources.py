"""What the dashboard reads from S3: live results, processor counters, corrected reports, CURRENT.

Every read goes through the module that owns the layout (``workers.processor.results``,
``workers.promote``, ``workers.keys``), so the dashboard shows exactly what the CLI and Dagster see.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import polars as pl

from workers import keys, promote
from workers.pipelines import Pipeline, known
from workers.processor import state as processor_state
from workers.replay import manifest as replay_manifest

DEFAULT_VERSION = 1


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def current_version(client: Any, bucket: str, pipeline: str) -> int | None:
    """The promoted version (``reports/<P>/CURRENT``), None when nothing was promoted."""
    return promote.current_version(client, bucket, pipeline)


def live_states(client: Any, bucket: str, pipeline: Pipeline) -> dict[int, dict[str, Any]]:
    """Committed checkpoint of every partition of the live processor of this pipeline version."""
    prefix = keys.processor_prefix(pipeline.name, pipeline.version, None)
    return processor_state.list_states(client, bucket, prefix)


def live_version_of_day(client: Any, bucket: str, pipeline: str, day: str, prefer: int | None) -> int | None:
    """The live version that actually processed ``day``: the one whose checkpoints saw most of its records.

    A promoted version often never ran live on the days it corrected, so comparing with *its* live
    output would show every window as changed. ``prefer`` wins ties (the version being looked at).
    """
    seen: dict[int, int] = {}
    for name, version in known():
        if name != pipeline:
            continue
        states = processor_state.list_states(client, bucket, keys.processor_prefix(name, version, None))
        records = processor_state.day_stats(states).get(day, {}).get("records", 0)
        if records:
            seen[version] = records
    if not seen:
        return None
    return max(seen, key=lambda version: (seen[version], version == prefer, version))


def day_stats(states: dict[int, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per-day outcome counters (records, counted, dlq, duplicates, late) over all partitions."""
    return processor_state.day_stats(states)


def corrected_reports(client: Any, bucket: str, pipeline: str) -> list[tuple[int, str]]:
    """Every (version, day) whose corrected report of ``pipeline`` is published: its blocking checks
    passed and the file is still the checked one. A report.parquet that is being
    recomputed, failed its checks or was never checked is not shown as corrected."""
    keys.valid_name(pipeline)
    return sorted(
        (m.version, m.day)
        for m in replay_manifest.iter_manifests(client, bucket)
        if m.pipeline == pipeline and replay_manifest.published(client, bucket, m)
    )


def report_versions(client: Any, bucket: str, pipeline: str, day: str) -> list[int]:
    """Versions that have a corrected report for ``day``, newest first."""
    day = keys.valid_day(day)
    return sorted((v for v, d in corrected_reports(client, bucket, pipeline) if d == day), reverse=True)


def newest_report_day(client: Any, bucket: str, pipeline: str) -> str | None:
    """The latest day any version has a corrected report for: the diff's default day."""
    return max((d for _v, d in corrected_reports(client, bucket, pipeline)), default=None)


def series(frame: pl.DataFrame, types: list[str]) -> dict[str, Any]:
    """Per-minute columns for the chart: ``x`` (epoch s) plus events and amount per type (0-filled)."""
    if frame.is_empty():
        return {"x": [], "events": {t: [] for t in types}, "amount": {t: [] for t in types}}
    minutes = frame.select(pl.col("window_start").unique().sort())
    out: dict[str, Any] = {"x": (minutes["window_start"].dt.epoch("s")).to_list(), "events": {}, "amount": {}}
    for event_type in types:
        rows = minutes.join(frame.filter(pl.col("type") == event_type), on="window_start", how="left")
        out["events"][event_type] = rows["events"].fill_null(0).to_list()
        out["amount"][event_type] = rows["amount"].fill_null(0.0).round(2).to_list()
    return out


def totals(frame: pl.DataFrame) -> dict[str, Any]:
    """Day totals, overall and by type."""
    by_type = frame.group_by("type").agg(pl.col("events").sum(), pl.col("amount").sum()).sort("type")
    return {
        "events": int(frame["events"].sum()) if frame.height else 0,
        "amount": round(float(frame["amount"].sum()), 2) if frame.height else 0.0,
        "windows": frame["window_start"].n_unique() if frame.height else 0,
        "by_type": {t: {"events": int(e), "amount": round(float(a), 2)} for t, e, a in by_type.iter_rows()},
    }
