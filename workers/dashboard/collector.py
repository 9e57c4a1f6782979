"""Builds the dashboard's snapshot: one JSON document per view (pipeline, version, day, diff day).

A failing source (a topic not created yet, S3 hiccup) turns into an ``error`` field of its own
section instead of failing the page, so a person always sees everything that *can* be read.
Snapshots are cached for a refresh interval: several browser tabs cost one set of S3/Kafka calls.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import polars as pl

from workers import keys, late
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.dashboard import sources
from workers.dashboard.dlq import DlqTail
from workers.errors import KappaError
from workers.lag import LagReader
from workers.pipelines import Pipeline, get_pipeline, known
from workers.processor import results
from workers.replay import status as replay_status
from workers.reports import diff as report_diff
from workers.reports import version_diff

DIFF_ROWS = 15


@dataclass(frozen=True)
class View:
    """What the person asked to see; None means "the sensible default"."""

    pipeline: str = "orders"
    version: int | None = None
    day: str | None = None
    diff_day: str | None = None

    @classmethod
    def parse(cls, params: dict[str, str]) -> View:
        """Query parameters -> a validated view, or a KappaError naming the bad parameter."""
        version = params.get("version") or None
        if version is not None and not version.isdigit():
            raise KappaError(f"version {version!r} must be a positive integer")
        day, diff_day = params.get("day") or None, params.get("diff_day") or None
        return cls(
            pipeline=keys.valid_name(params.get("pipeline") or "orders"),
            version=keys.valid_version(int(version)) if version else None,
            day=keys.valid_day(day) if day else None,
            diff_day=keys.valid_day(diff_day) if diff_day else None,
        )


def live_group(pipeline: Pipeline, states: dict[int, dict[str, Any]], prefix: str) -> str:
    """The live processor's group as its checkpoints name it (``--group``), else the default name."""
    named = next((s["group"] for s in states.values() if s.get("group")), None)
    return named or keys.live_group(pipeline.name, pipeline.version, prefix=prefix)


def _section(build: Callable[[], Any]) -> Any:
    """Run one section builder; an exception becomes ``{"error": "..."}`` for that section only."""
    try:
        return build()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _frame_rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    rows = frame.with_columns(pl.col("window_start").dt.strftime("%Y-%m-%dT%H:%MZ")).to_dicts()
    return [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]


def biggest_changes(changed: pl.DataFrame) -> pl.DataFrame:
    """Largest event deltas first (then by time): the rows a reviewer should look at."""
    magnitude = pl.col("events_delta").abs() + pl.col("amount_delta").abs() / 1e12
    return changed.sort(magnitude, "window_start", "type", descending=[True, False, False])


class Collector:
    """Holds the long-lived readers (S3 client, AdminClient, DLQ tail, rate history)."""

    def __init__(self, settings: Settings, interval: float = 2.0) -> None:
        self.settings, self.interval = settings, interval
        self.client = s3_helpers.s3_client(settings, retries=2)
        self.lag = LagReader(settings)
        self.rates = replay_status.RateTracker()
        self.dlq = DlqTail(settings, settings.dlq_topic)
        self.late_share = late.rerun_share()
        self.lock = threading.Lock()
        self.cache: dict[View, tuple[float, dict[str, Any]]] = {}

    def close(self) -> None:
        self.dlq.close()

    # ---------------------------------------------------------------- entry point

    def snapshot(self, view: View) -> dict[str, Any]:
        """The whole page's data for ``view`` (cached for one refresh interval)."""
        with self.lock:
            cached = self.cache.get(view)
            if cached and time.monotonic() - cached[0] < self.interval * 0.9:
                return cached[1]
            data = self._build(view)
            self.cache = {view: (time.monotonic(), data)}
            return data

    def _build(self, view: View) -> dict[str, Any]:
        bucket = self.client, self.settings.s3_bucket
        current = sources.current_version(*bucket, view.pipeline)
        pipeline = get_pipeline(view.pipeline, view.version or current or sources.DEFAULT_VERSION)
        states = _section(lambda: sources.live_states(*bucket, pipeline))
        failed, states = (states, {}) if "error" in states else (None, states)
        stats = sources.day_stats(states)
        day = view.day or (max(stats) if stats else sources.today())
        group = live_group(pipeline, states, self.settings.group_prefix)
        view = replace(view, diff_day=view.diff_day or self._diff_day(view.pipeline, day))
        return {
            "view": {**self._view(view, pipeline, current, day), "live_group": group},
            "results": _section(lambda: self._results(pipeline, day)),
            "processor": failed or _section(lambda: self._processor(states, stats, day)),
            "dlq": _section(self._dlq),
            "lag": _section(lambda: self._lags(group)),
            "replays": _section(self._replays),
            "diff": _section(lambda: self._diff(pipeline, current, view.diff_day or day)),
            "causes": _section(lambda: self._causes(pipeline, view.diff_day or day)),
        }

    # ---------------------------------------------------------------- sections

    def _diff_day(self, pipeline: str, day: str) -> str:
        """The shown day if it has a corrected report, else the newest day that has one."""
        if sources.report_versions(self.client, self.settings.s3_bucket, pipeline, day):
            return day
        return sources.newest_report_day(self.client, self.settings.s3_bucket, pipeline) or day

    def _view(self, view: View, pipeline: Pipeline, current: int | None, day: str) -> dict[str, Any]:
        return {
            "pipeline": pipeline.name,
            "version": pipeline.version,
            "current_version": current,
            "day": day,
            "diff_day": view.diff_day or day,
            "pipelines": [{"name": n, "version": v} for n, v in known()],
            "bucket": self.settings.s3_bucket,
            "events_topic": self.settings.events_topic,
            "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def _results(self, pipeline: Pipeline, day: str) -> dict[str, Any]:
        # open windows too: a person watching wants the current minute (the corrected report is the authority)
        frame = results.live_results(self.client, self.settings.s3_bucket, pipeline.name, pipeline.version, day,
                                     include_open=True)
        types = sorted(frame["type"].unique().to_list()) if "type" in frame.columns else []
        return {"totals": sources.totals(frame), "types": types, "series": sources.series(frame, types)}

    def _processor(self, states: dict[int, dict[str, Any]], stats: dict[str, dict[str, int]], day: str) -> dict:
        updated = [s.get("updated_at") for s in states.values() if s.get("updated_at")]
        return {
            "partitions": len(states),
            "updated_at": max(updated) if updated else None,
            "day": stats.get(day, {}),
            "late_all_days": sum(s.get("late", 0) for s in stats.values()),
            "days": sorted(stats, reverse=True),
            **self._late_rates(stats),
        }

    def _late_rates(self, stats: dict[str, dict[str, int]]) -> dict[str, Any]:
        """Late share per day (late / records); above KAPPA_LATE_RERUN_SHARE a day is a re-run candidate."""
        rows = late.late_by_day(stats, self.late_share)
        return {"late_rerun_share": self.late_share, "late_by_day": [row.as_dict() for row in rows]}

    def _dlq(self) -> dict[str, Any]:
        tail = self.dlq.refresh()
        return {**tail, "rate": self.rates.observe("dlq", tail["records"])}

    def _lags(self, selected: str) -> list[dict[str, Any]]:
        """Archiver and live groups on the events topic (the selected one always, others once started)."""
        events = self.settings.events_topic
        prefix = self.settings.group_prefix
        live = dict.fromkeys([selected, *(keys.live_group(n, v, prefix=prefix) for n, v in known())])
        rows = []
        for kind, group in [("archiver", keys.archiver_group(prefix)), *(("live", g) for g in live)]:
            lag = self.lag.group_lag(group, events)
            if lag is not None and (lag.started or group == selected):
                rate = self.rates.observe(f"group:{group}", lag.consumed)
                rows.append({"kind": kind, **lag.as_dict(), "rate": rate})
        return rows

    def _replays(self) -> list[dict[str, Any]]:
        rows = replay_status.replay_rows(self.settings, self.lag, self.rates, self.client)
        rows = [row for row in rows if row.source_topic in (None, self.settings.events_topic)]
        return [row.as_dict() for row in rows]

    def _causes(self, pipeline: Pipeline, day: str) -> dict[str, Any]:
        """The stored version diff (``diff.parquet``, from Dagster's ``version_diff``) of the shown version
        and diff day, summed per cause; the dashboard never computes it (it reads the whole archive)."""
        stored = version_diff.read(self.client, self.settings.s3_bucket, pipeline.name, pipeline.version, day)
        base = {"day": day, "version": pipeline.version}
        if stored is None:
            return {**base, "available": False, "message": f"no version diff of {pipeline.label} for {day}"}
        rows = version_diff.by_cause(stored).to_dicts()
        causes = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
        return {**base, "available": True, "causes": causes}

    def _diff(self, pipeline: Pipeline, current: int | None, day: str) -> dict[str, Any]:
        bucket = self.client, self.settings.s3_bucket
        versions = sources.report_versions(*bucket, pipeline.name, day)
        corrected_version = current if current in versions else (versions[0] if versions else None)
        base = {"day": day, "live_version": pipeline.version, "promoted_version": current}
        report = None if corrected_version is None else results.corrected_report(
            *bucket, pipeline.name, corrected_version, day)
        if report is None:
            return {**base, "available": False, "message": f"no corrected report for {day} yet"}
        live_version = sources.live_version_of_day(*bucket, pipeline.name, day, prefer=pipeline.version)
        if live_version is None:
            return {**base, "available": False, "message": f"no live processor of {pipeline.name} saw {day}"}
        corrected = report.frame
        live = results.live_results(*bucket, pipeline.name, live_version, day, include_open=True)
        summary = report_diff.summary(corrected, live)
        return {
            **base,
            "live_version": live_version,
            "available": True,
            "corrected_version": corrected_version,
            "promoted": corrected_version == current,
            "corrected_events": int(corrected["events"].sum()),
            "live_events": int(live["events"].sum()) if live.height else 0,
            "windows_compared": summary["windows_compared"],
            "windows_changed": summary["windows_changed"],
            "events_delta": summary["events_delta"],
            "amount_delta": summary["amount_delta"],
            "rows": _frame_rows(biggest_changes(summary["changed"]).head(DIFF_ROWS)),
        }
