"""The pipeline interface: what a user writes to add a stream computation, nothing about Kafka or S3.

The engine owns Kafka, watermarks, state, checkpoints and the DLQ; a pipeline owns vectorised steps
whose ``merge`` is associative, which is what makes results independent of batching, partitions and
crashes (docs/ARCHITECTURE.md, "Writing a new pipeline").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, TypeVar

import polars as pl

from workers.errors import KappaError
from workers.keys import MAX_DAY_MS

#: rows or partials, eager or lazy: the engine folds a batch as lazy plans collected together
FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)
#: Column of :meth:`Pipeline.parse` output: why a value was rejected, null when valid.
REJECT = "reject"
#: Column the engine and the batch reference add: window start in epoch milliseconds.
WINDOW_MS = "window_ms"
NO_TIMESTAMP = "record has no timestamp"
TIMESTAMP_OUT_OF_RANGE = "timestamp after 9999-12-31 (no calendar day)"
#: the timestamps the engine windows: 1970-01-01 .. 9999-12-31 (negative = none, past 9999: no day)
MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS = 0, MAX_DAY_MS
DAY_MS = 86_400_000
#: Outcome counters of every record; ``records == counted + dlq + duplicates + late``.
STAT_NAMES = ("records", "counted", "dlq", "duplicates", "late")
#: Column of :meth:`Pipeline.diff_rules` output: the record's outcome, one of the non-``records`` stats.
OUTCOME = "outcome"


class Pipeline(ABC):
    """Subclass, set the class attributes, implement parse/aggregate/merge; register in the registry."""

    name: ClassVar[str]
    version: ClassVar[int]
    summary: ClassVar[str] = ""
    window_ms: ClassVar[int] = 60_000
    group_by: ClassVar[tuple[str, ...]] = ()
    dedup_by: ClassVar[tuple[str, ...]] = ()
    #: The pipeline's definition in SQL (a file next to its module, run by ``workers.reports.reference`` on
    #: DuckDB): the independent reference its corrected reports must equal before they are published.
    reference_sql: ClassVar[str | None] = None
    #: DuckDB variables the SQL reads with ``getvariable(name)`` (e.g. a version's switches).
    reference_params: ClassVar[dict[str, bool | int | str]] = {}
    #: Columns the state is keyed by; non-empty = two stages with a shuffle (must be part of dedup_by).
    state_key: ClassVar[tuple[str, ...]] = ()
    #: Schema of the partials (window_start + group_by + accumulators) and of the output rows.
    partial_schema: ClassVar[pl.Schema]
    output_schema: ClassVar[pl.Schema]

    # ------------------------------------------------------------------ the user's part

    @abstractmethod
    def parse(self, values: Sequence[bytes | None]) -> pl.DataFrame:
        """One row per value: typed fields plus :data:`REJECT` (reason, null when valid)."""

    @abstractmethod
    def aggregate(self, rows: FrameT) -> FrameT:
        """Counted rows (parsed fields + ``window_start``) -> partials (:attr:`partial_schema`).

        Eager or lazy: write it with the methods both frames have (the engine passes a LazyFrame)."""

    @abstractmethod
    def merge(self, partials: FrameT) -> FrameT:
        """Combine partial rows that share a key; associative and commutative (eager or lazy)."""

    def finalize(self, partials: pl.DataFrame) -> pl.DataFrame:
        """Merged partials -> output rows, sorted by key. Default: partials are the output."""
        return self.merge(partials).select(self.output_schema.names()).sort(self.key_columns)

    # ------------------------------------------------------------------ helpers the engine uses

    @property
    def key_columns(self) -> list[str]:
        return ["window_start", *self.group_by]

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    def empty_partials(self) -> pl.DataFrame:
        return self.partial_schema.to_frame()

    def with_window(self, rows: pl.DataFrame, timestamp_ms: str = "timestamp_ms") -> pl.DataFrame:
        """Add the tumbling window start, as epoch ms (engine math) and as ``window_start`` datetime."""
        start = (pl.col(timestamp_ms) // self.window_ms) * self.window_ms
        return rows.with_columns(start.alias(WINDOW_MS), start.cast(pl.Datetime("ms", "UTC")).alias("window_start"))

    # ------------------------------------------------------------------ independent batch reference

    def batch_report(self, archive: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
        """The whole-day reference over raw archive rows (the report contract): returns (report, stats).

        Dedup ``(topic, partition, offset)`` first, then this pipeline's rules over all rows at once.
        Nothing is late here: the report covers every record, as a bounded replay does.
        """
        frame = archive.unique(subset=["topic", "partition", "offset"], keep="first").sort("partition", "offset")
        timestamp_ms = frame["timestamp"].dt.epoch("ms").alias("timestamp_ms")
        parsed = self.parse(frame["value"].to_list())
        rows = pl.concat([frame.select("partition", "offset"), parsed], how="horizontal").with_columns(timestamp_ms)
        rows = rows.with_columns(reject_missing_timestamp())
        valid = self.with_window(rows.filter(pl.col(REJECT).is_null()))
        counted = self.batch_dedup(valid)
        report = self.finalize(self.aggregate(counted))
        stats = {
            "records": frame.height,
            "counted": counted.height,
            "dlq": frame.height - valid.height,
            "duplicates": valid.height - counted.height,
            "late": 0,
        }
        return report, stats

    def diff_rules(self, archive: pl.DataFrame, grace_ms: int | None,
                   observed_late: pl.DataFrame | None = None) -> pl.DataFrame:
        """Per distinct archived record: ``partition``, ``offset``, :data:`OUTCOME` under this version
        (counted/dlq/duplicates/late), the key columns and what it adds to each output measure.

        A version diff (``workers/reports/version_diff.py``) attributes differences to causes from
        these rows; ``grace_ms`` is the live watermark's grace, None for a bounded replay (nothing late);
        ``observed_late`` (see :meth:`classify_archive`) the records a live run found late.
        """
        raise KappaError(f"{self.label} supplies no diff rules: implement Pipeline.diff_rules to diff its versions")

    def classify_archive(self, archive: pl.DataFrame, grace_ms: int | None,
                         observed_late: pl.DataFrame | None = None) -> pl.DataFrame:
        """The engine's per-record outcomes restated over a day's archive (offset order per partition):
        dlq when rejected, late when its window closed before it arrived, then duplicates per :meth:`batch_dedup`.

        Late is restated per partition (the single-stage watermark), unless ``observed_late`` names
        the late records (``partition``, ``offset``): a pipeline with a state key judges lateness after
        its shuffle, where it depends on how the stages interleaved, so the caller reads it off the
        live run's late topic instead."""
        frame = archive.unique(subset=["topic", "partition", "offset"], keep="first").sort("partition", "offset")
        parsed = self.parse(frame["value"].to_list())
        rows = pl.concat([frame.select("partition", "offset"), parsed], how="horizontal")
        rows = rows.with_columns(frame["timestamp"].dt.epoch("ms").alias("timestamp_ms"))
        rows = self.with_window(rows.with_columns(reject_missing_timestamp()))
        late = pl.lit(False)
        if observed_late is not None:
            flags = observed_late.select(pl.col("partition").cast(rows.schema["partition"]),
                                         pl.col("offset").cast(rows.schema["offset"]), pl.lit(True).alias("_late"))
            rows = rows.join(flags.unique(), on=["partition", "offset"], how="left", maintain_order="left")
            late = pl.col("_late").fill_null(False)
        elif grace_ms is not None:
            valid_ts = pl.when(pl.col(REJECT).is_null()).then(pl.col("timestamp_ms"))
            before = valid_ts.cum_max().forward_fill().shift(1).over("partition")
            late = (pl.col(WINDOW_MS) + self.window_ms <= before - grace_ms).fill_null(False)
        outcome = pl.when(pl.col(REJECT).is_not_null()).then(pl.lit("dlq")).when(late).then(pl.lit("late"))
        rows = rows.with_columns(outcome.otherwise(pl.lit("counted")).alias(OUTCOME))
        candidates = rows.filter(pl.col(OUTCOME) == "counted")
        kept = self.batch_dedup(candidates).select("partition", "offset").with_columns(pl.lit(True).alias("_kept"))
        rows = rows.join(kept, on=["partition", "offset"], how="left", maintain_order="left")
        dropped = (pl.col(OUTCOME) == "counted") & pl.col("_kept").is_null()
        return rows.with_columns(
            pl.when(dropped).then(pl.lit("duplicates")).otherwise(pl.col(OUTCOME)).alias(OUTCOME)
        ).drop("_kept", "_late", strict=False)

    def batch_dedup(self, valid: pl.DataFrame) -> pl.DataFrame:
        """Keep one copy per (window, dedup_by): across partitions the smallest (timestamp, partition,
        offset) when the pipeline has a state key, else per partition the lowest offset."""
        if not self.dedup_by:
            return valid
        if self.state_key:
            ordered = valid.sort("timestamp_ms", "partition", "offset")
            return ordered.unique(subset=[WINDOW_MS, *self.dedup_by], keep="first", maintain_order=True)
        return valid.unique(subset=["partition", WINDOW_MS, *self.dedup_by], keep="first", maintain_order=True)


def reject_missing_timestamp() -> pl.Expr:
    """Records without a usable Kafka timestamp cannot be windowed: reject them (engine and reference).

    Negative is Kafka's "no timestamp"; past 9999-12-31 there is no ``YYYY-MM-DD`` day to report
    it under (older brokers accept such timestamps)."""
    valid = pl.col(REJECT).is_null()
    return (
        pl.when(valid & (pl.col("timestamp_ms") < MIN_TIMESTAMP_MS))
        .then(pl.lit(NO_TIMESTAMP))
        .when(valid & (pl.col("timestamp_ms") > MAX_TIMESTAMP_MS))
        .then(pl.lit(TIMESTAMP_OUT_OF_RANGE))
        .otherwise(pl.col(REJECT))
        .alias(REJECT)
    )


def check_window(cls: type[Pipeline]) -> None:
    """Windows must tile a UTC day: a window straddling midnight would belong to two day reports."""
    width = cls.window_ms
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0 or DAY_MS % width:
        raise KappaError(
            f"pipeline {cls.name} v{cls.version}: window_ms={width!r} does not divide a day (86400000 ms); "
            "use e.g. 60000 (1 min), 300000 (5 min) or 3600000 (1 h)"
        )
