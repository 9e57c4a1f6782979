"""The late share per day (late / records of the live processor) and when a day is worth a re-run.

Live windows close at the watermark, so a day with many late records under-counts in its live
results; its corrected report (a replay, no lateness) fixes that. The dashboard shows the share and
Dagster's ``live_late_share`` check flags a day above ``KAPPA_LATE_RERUN_SHARE`` (docs/ARCHITECTURE.md,
"Late records").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from workers import kafka as kafka_helpers
from workers import keys
from workers.config import Settings
from workers.errors import KappaError
from workers.pipelines import known
from workers.processor import state as processor_state
from workers.processor.engine import LATE_HEADERS

RERUN_SHARE_ENV = "KAPPA_LATE_RERUN_SHARE"
DEFAULT_RERUN_SHARE = 0.01


def rerun_share(env: Mapping[str, str] | None = None) -> float:
    """The share of late records above which a day is a re-run candidate (0 < share <= 1)."""
    raw = (os.environ if env is None else env).get(RERUN_SHARE_ENV, "").strip()
    if not raw:
        return DEFAULT_RERUN_SHARE
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise KappaError(f"{RERUN_SHARE_ENV}={raw!r} must be a number in (0, 1], e.g. 0.01 for 1 %")
    return share


@dataclass(frozen=True)
class DayLate:
    """One day's live counters and whether its late share makes it a re-run candidate."""

    day: str
    records: int
    late: int
    threshold: float

    @property
    def share(self) -> float:
        return self.late / self.records if self.records else 0.0

    @property
    def candidate(self) -> bool:
        return self.share > self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {"day": self.day, "records": self.records, "late": self.late, "share": round(self.share, 6),
                "candidate": self.candidate}


def late_by_day(stats: Mapping[str, Mapping[str, int]], threshold: float) -> list[DayLate]:
    """Per-day counters (``processor.state.day_stats``) -> one row per day, newest first."""
    rows = [DayLate(day, int(s.get("records", 0)), int(s.get("late", 0)), threshold) for day, s in stats.items()]
    return sorted(rows, key=lambda row: row.day, reverse=True)


def live_days(client: Any, bucket: str, threshold: float) -> list[tuple[str, DayLate]]:
    """Every day every live processor counted: ``("<P> v<V>", row)``, newest day first."""
    found = []
    for name, version in known():
        states = processor_state.list_states(client, bucket, keys.live_prefix(name, version))
        found += [(f"{name} v{version}", row) for row in late_by_day(processor_state.day_stats(states), threshold)]
    return sorted(found, key=lambda item: (item[1].day, item[0]), reverse=True)


def observed_late(settings: Settings, label: str) -> pl.DataFrame:
    """``partition``, ``offset`` of every source record the live ``label`` (e.g. ``orders v2``) put on
    the late topic. Through a shuffle, which record is late depends on how the stages interleaved, so
    it is read from what the live run wrote rather than restated from the archive."""
    topic_h, partition_h, offset_h, *_window_and_watermark, pipeline_h = LATE_HEADERS
    rows = set()
    for headers in kafka_helpers.read_headers(settings, settings.late_topic):
        named = {name: value for name, value in headers if value is not None}
        if named.get(topic_h) == settings.events_topic.encode() and named.get(pipeline_h) == label.encode():
            rows.add((int(named[partition_h]), int(named[offset_h])))
    return pl.DataFrame(sorted(rows), schema={"partition": pl.Int32, "offset": pl.Int64}, orient="row")
