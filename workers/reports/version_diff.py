"""The version diff of a day: a candidate's corrected report against what users read, every difference
attributed to a cause (docs/ARCHITECTURE.md, "The version diff").

Causes come from the pipeline's own per-record rules (``Pipeline.diff_rules``) run over the day's
archive snapshot under both versions, never from the engine's state: a record counted by one side
only was a duplicate, late, or malformed under one of them. What the known causes do not explain is
the "logic change". Measures are compared as exact integers (decimals in millionths), so "fully
explained" means zero, not "small".
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from workers import keys, late
from workers import s3 as s3_helpers
from workers.archive.format import read_day
from workers.config import Settings
from workers.dashboard.sources import live_version_of_day
from workers.errors import KappaError
from workers.pipelines import Pipeline, get_pipeline
from workers.pipelines.base import OUTCOME
from workers.processor import handoff, results
from workers.processor.engine import LIVE_GRACE_MS

#: The (partition, offset) of the records a live version found late, read off its late topic
#: (:func:`workers.late.observed_late`): needed for a pipeline with a state key.
LateSource = Callable[[Pipeline], pl.DataFrame]

CAUSE = "cause"
DUPLICATES, LATE, MALFORMED, LOGIC = "duplicates", "late", "malformed", "logic change"
CAUSES = (DUPLICATES, LATE, MALFORMED, LOGIC)
#: decimals are compared in millionths (the orders amounts are Decimal(38, 6))
SCALE = 1_000_000


@dataclass(frozen=True)
class Baseline:
    """What users read for the day and, per archived record, how it was counted there."""

    label: str
    report: pl.DataFrame
    rows: pl.DataFrame


@dataclass
class VersionDiff:
    """The diff of one (pipeline, candidate version, day): rows per (key, cause) and totals per cause."""

    pipeline: str
    version: int
    day: str
    baseline: str
    frame: pl.DataFrame
    totals: dict[str, dict[str, float | int]] = field(default_factory=dict)

    @property
    def unexplained(self) -> int:
        """(window, group) rows with a difference no known cause explains."""
        return int(self.totals[LOGIC]["groups"])

    def line(self) -> str:
        """One line per day for ``kappa promote`` and the Dagster promote job."""
        parts = [f"{c} {t['groups']} groups, {_measures_text(t)}" for c, t in self.totals.items() if t["groups"]]
        what = "; ".join(parts) or "no difference"
        return f"{self.day}: v{self.version} vs {self.baseline}: {what}"


def _measures_text(totals: dict[str, float | int]) -> str:
    return ", ".join(f"{name} {value:+,}" for name, value in totals.items() if name != "groups")


def measures(pipeline: Pipeline) -> list[str]:
    return [name for name in pipeline.output_schema.names() if name not in pipeline.key_columns]


def float_measures(pipeline: Pipeline) -> set[str]:
    """Measures compared in millionths and written back in units."""
    return {n for n in measures(pipeline) if not pipeline.output_schema[n].is_integer()}


def exact(frame: pl.DataFrame, names: list[str]) -> pl.DataFrame:
    """Measures as integers: counts stay, floats and decimals become millionths (the report's precision)."""
    return frame.with_columns(
        (pl.col(n).cast(pl.Decimal(38, 6)) * SCALE).cast(pl.Int64) if not frame.schema[n].is_integer() else pl.col(n)
        for n in names
    )


def record_cause(baseline: pl.Expr, candidate: pl.Expr) -> pl.Expr:
    """Why one record is counted by one side only (null when both sides treat it alike)."""
    one_rejects = (baseline == "dlq") != (candidate == "dlq")
    late = (baseline == "late") | (candidate == "late")
    differs = (baseline == "counted") != (candidate == "counted")
    return (
        pl.when(~differs)
        .then(pl.lit(None, pl.String))
        .when(one_rejects)
        .then(pl.lit(MALFORMED))
        .when(late)
        .then(pl.lit(LATE))
        .otherwise(pl.lit(DUPLICATES))
    )


def explained(key: list[str], names: list[str], baseline: pl.DataFrame, candidate: pl.DataFrame) -> pl.DataFrame:
    """Per (key, cause): what the records counted by one version only add (candidate) or remove (baseline)."""
    record = ["partition", "offset"]
    causes = baseline.select(*record, pl.col(OUTCOME).alias("_b")).join(
        candidate.select(*record, pl.col(OUTCOME).alias("_c")), on=record, how="full", coalesce=True
    )
    causes = causes.select(
        *record, record_cause(pl.col("_b").fill_null("absent"), pl.col("_c").fill_null("absent")).alias(CAUSE)
    )
    causes = causes.filter(pl.col(CAUSE).is_not_null())
    sides = []
    for rows, sign in ((candidate, 1), (baseline, -1)):
        counted = exact(rows.filter(pl.col(OUTCOME) == "counted"), names).join(causes, on=record)
        sides.append(counted.select(*key, CAUSE, *(pl.col(n) * sign for n in names)))
    return pl.concat(sides).group_by(*key, CAUSE).agg(pl.col(n).sum() for n in names)


def attribute(
    key: list[str], names: list[str], baseline: Baseline, candidate: pl.DataFrame, rows: pl.DataFrame
) -> pl.DataFrame:
    """Rows (key, cause, measures): the known causes, then the logic change = actual delta - explained."""
    cand, base = exact(candidate, names), exact(baseline.report, names)
    actual = cand.join(base, on=key, how="full", coalesce=True, suffix="_b").select(
        *key, *((pl.col(n).fill_null(0) - pl.col(f"{n}_b").fill_null(0)).alias(n) for n in names)
    )
    known = explained(key, names, baseline.rows, rows)
    known_sum = known.group_by(key).agg(pl.col(n).sum().alias(f"{n}_k") for n in names)
    logic = actual.join(known_sum, on=key, how="full", coalesce=True).select(
        *key,
        pl.lit(LOGIC).alias(CAUSE),
        *((pl.col(n).fill_null(0) - pl.col(f"{n}_k").fill_null(0)).alias(n) for n in names),
    )
    frame = pl.concat([known, logic.select(known.columns)])
    return frame.filter(pl.any_horizontal(pl.col(n) != 0 for n in names)).sort(CAUSE, *key)


def totals(frame: pl.DataFrame, names: list[str], floats: set[str]) -> dict[str, dict[str, float | int]]:
    """Per cause: groups touched and the summed measures (floats back in units)."""
    out: dict[str, dict[str, float | int]] = {}
    for cause in CAUSES:
        part = frame.filter(pl.col(CAUSE) == cause)
        sums = {n: int(part[n].sum()) for n in names}
        out[cause] = {"groups": part.height, **{n: sums[n] / SCALE if n in floats else sums[n] for n in names}}
    return out


@dataclass(frozen=True)
class Archive:
    """The day's archive snapshot, and the next day's: records of the next day that arrived before a
    record of this day move the live watermark too (a record late across midnight)."""

    day: pl.DataFrame
    next_day: pl.DataFrame
    late_source: LateSource | None = None

    def rules(self, pipeline: Pipeline, grace_ms: int | None) -> pl.DataFrame:
        """The pipeline's per-record rules for this day's records, live (``grace_ms``) or replayed (None).
        Live lateness is restated per partition, or, with a state key (judged after the shuffle), read."""
        if grace_ms is None:
            return pipeline.diff_rules(self.day, None)
        if pipeline.state_key:
            if self.late_source is None:
                raise KappaError(f"live {pipeline.label} judged lateness after its shuffle: the diff needs its "
                                 "late topic (pass the Kafka settings)")
            return pipeline.diff_rules(self.day, grace_ms, self.late_source(pipeline))
        rows = pipeline.diff_rules(pl.concat([self.day, self.next_day]), grace_ms)
        return rows.join(self.day.select("partition", "offset"), on=["partition", "offset"], how="semi")


def read_archive(client: Any, bucket: str, topic: str, day: str, late_source: LateSource | None = None) -> Archive:
    following = (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()
    return Archive(read_day(client, bucket, topic, day), read_day(client, bucket, topic, following), late_source)


def baseline_of(client: Any, bucket: str, pipeline: str, day: str, archive: Archive, grace_ms: int) -> Baseline | None:
    """What users read today for ``day``: the promoted version (corrected below its switch + live), else
    the live results of the version that processed the day; None when nothing served it."""
    pointer = handoff.read_pointer(client, bucket, pipeline)
    if pointer is not None and "switch" in pointer:
        switch = handoff.switch_of(pointer)
        if day in switch.covered:
            version, report = handoff.served_report(client, bucket, pipeline, day)
            bounds = switch.covered[day]
            impl = get_pipeline(pipeline, version)
            replayed, live = archive.rules(impl, None), archive.rules(impl, grace_ms)
            below = pl.col("offset") < pl.col("partition").replace_strict(bounds, default=0, return_dtype=pl.Int64)
            rows = pl.concat([replayed.filter(below), live.filter(~below)])
            return Baseline(f"promoted v{version} (corrected + live)", report, rows)
    version = live_version_of_day(client, bucket, pipeline, day, prefer=None)
    if version is None:
        return None
    report = results.live_results(client, bucket, pipeline, version, day, include_open=True)
    return Baseline(f"live v{version}", report, archive.rules(get_pipeline(pipeline, version), grace_ms))


def compute(
    client: Any, bucket: str, topic: str, pipeline: str, version: int, day: str, grace_ms: int = LIVE_GRACE_MS,
    late_source: LateSource | None = None,
) -> VersionDiff:
    """The diff of the candidate's corrected report of ``day`` against what users read for it."""
    impl = get_pipeline(pipeline, version)
    archive = read_archive(client, bucket, topic, day, late_source)
    names, key = measures(impl), impl.key_columns
    floats = float_measures(impl)
    baseline = baseline_of(client, bucket, pipeline, day, archive, grace_ms)
    if baseline is None:  # users read nothing for the day yet: nothing to explain
        empty = pl.DataFrame(
            schema={**{k: impl.output_schema[k] for k in key}, CAUSE: pl.String, **dict.fromkeys(names, pl.Int64)}
        )
        return VersionDiff(pipeline, version, day, "nothing (no live results)", empty, totals(empty, names, floats))
    corrected = results.corrected_report(client, bucket, pipeline, version, day)
    if corrected is None:
        raise KappaError(f"no corrected report of {impl.label} for {day}: run the reprocess job first")
    frame = attribute(key, names, baseline, corrected.frame, archive.rules(impl, None))
    return VersionDiff(pipeline, version, day, baseline.label, frame, totals(frame, names, floats))


def as_output(diff: VersionDiff, floats: set[str]) -> pl.DataFrame:
    """The ``diff.parquet`` rows: key, cause, measure deltas (candidate - baseline) in the report's units."""
    return diff.frame.with_columns((pl.col(n) / SCALE).alias(n) for n in floats)


def write(client: Any, bucket: str, diff: VersionDiff) -> str:
    """Write ``reports/<P>/v<V>/dt=<D>/diff.parquet`` and return its key."""
    buffer = io.BytesIO()
    as_output(diff, float_measures(get_pipeline(diff.pipeline, diff.version))).write_parquet(buffer)
    key = keys.diff_file(diff.pipeline, diff.version, diff.day)
    client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue(), ContentType="application/vnd.apache.parquet")
    return key


def read(client: Any, bucket: str, pipeline: str, version: int, day: str) -> pl.DataFrame | None:
    """The stored diff of a version and day, None until the ``version_diff`` asset wrote it."""
    body = s3_helpers.get_bytes(client, bucket, keys.diff_file(pipeline, version, day))
    return None if body is None else pl.read_parquet(io.BytesIO(body))


def by_cause(frame: pl.DataFrame) -> pl.DataFrame:
    """The stored diff summed per cause (for tables): groups and measures."""
    names = [c for c in frame.columns if frame.schema[c].is_numeric()]
    return frame.group_by(CAUSE).agg(pl.len().alias("groups"), *(pl.col(n).sum() for n in names)).sort(CAUSE)


def late_topic_source(settings: Settings) -> LateSource:
    """Read a live version's late records off ``settings.late_topic`` (the processors' late topic),
    once per version: a promote diffs every day against the same topic."""
    read: dict[str, pl.DataFrame] = {}

    def source(pipeline: Pipeline) -> pl.DataFrame:
        if pipeline.label not in read:
            read[pipeline.label] = late.observed_late(settings, pipeline.label)
        return read[pipeline.label]

    return source
