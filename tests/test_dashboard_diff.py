"""The dashboard's live-vs-corrected diff compares a corrected day with the live version that ran it.

Set-up on the real stack: a day of orders with duplicates runs through a live v1 processor only;
a corrected v2 report of that day exists and v2 is promoted (CURRENT). v2 never ran live on that
day, so comparing with the promoted version's (empty) live output would mark every row "changed".
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import polars as pl
from dagster_e2e import publish_replay, run_live_v1_until_caught_up

from workers import keys
from workers.config import Settings
from workers.dashboard.collector import Collector, View
from workers.dev.generator import Faults, produce_events
from workers.processor.results import corrected_report, live_results

DAY = "2026-11-24"


def test_diff_uses_the_live_version_that_processed_the_day(settings: Settings, s3: Any) -> None:
    faults = Faults(duplicates=0.2, late=0.0, malformed=0.0)
    produce_events(settings, 800, start=f"{DAY}T10:00:00+00:00", days=20 / 1440, partitions=2, seed=5, faults=faults)
    run_live_v1_until_caught_up(settings, s3)
    # the corrected v2 report of the day, archived, replayed and through the gate (only a published
    # report is shown as corrected)
    archiver = [sys.executable, "-m", "workers.cli", "archiver", "--until-end"]
    subprocess.run(archiver, check=True, capture_output=True, timeout=120)
    publish_replay(settings, s3, 2, DAY)
    pointer = {"pipeline": "orders", "version": 2, "reports_prefix": "reports/orders/v2/", "days": [DAY]}
    s3.put_object(Bucket=settings.s3_bucket, Key=keys.current_pointer("orders"), Body=json.dumps(pointer).encode())

    collector = Collector(settings, interval=0.1)
    try:
        diff = collector.snapshot(View(pipeline="orders", diff_day=DAY))["diff"]
    finally:
        collector.close()

    report = corrected_report(s3, settings.s3_bucket, "orders", 2, DAY)
    assert report is not None
    corrected = report.frame
    live_v1 = live_results(s3, settings.s3_bucket, "orders", 1, DAY, include_open=True)
    duplicates = int(live_v1["events"].sum()) - int(corrected["events"].sum())
    assert duplicates > 0  # the fault landed: v1 counted copies that v2 dropped
    assert diff["available"], diff
    assert (diff["live_version"], diff["corrected_version"], diff["promoted"]) == (1, 2, True)
    assert diff["events_delta"] == -duplicates
    assert diff["live_events"] == int(live_v1["events"].sum())
    # only windows that held a duplicate differ, not every row as against v2's empty live output
    windows_with_copies = live_v1.join(corrected, on=["window_start", "type"], how="full", coalesce=True).filter(
        pl.col("events").fill_null(0) != pl.col("events_right").fill_null(0)
    )
    assert diff["windows_changed"] == windows_with_copies.height < diff["windows_compared"]
