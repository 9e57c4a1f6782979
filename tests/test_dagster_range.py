"""Many days as one replay: the run a single-run backfill launches (``reprocess`` over a partition range)
loads every day into ONE replay topic, consumes it with ONE group, and writes each day's report, checked
per day; the reports equal the one-day replays' and the independent computations, with 1 or 2 consumers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster_e2e import (
    RANGE_END,
    RANGE_START,
    archive,
    day_check_results,
    materialization_metadata,
    publish_replay,
    report,
    reprocess_range,
)
from dagster_env import dagster_home  # noqa: F401  (fixture)
from polars.testing import assert_frame_equal
from replay_data import orders_report, write_days

from workers.config import Settings
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest

pytestmark = pytest.mark.slow
DAYS = ["2026-11-20", "2026-11-21", "2026-11-22"]
WEEK = [f"2026-11-{day:02d}" for day in range(20, 27)]
GREEN = {"report_matches_reference": True, "records_accounted": True, "report_matches_batch": True}


def manifests(s3: Any, settings: Settings, days: list[str]) -> dict[str, ReplayManifest]:
    found = {}
    for day in days:
        slot = replay_manifest.replay_id("orders", 2, day, settings.s3_bucket, settings.events_topic)
        manifest = replay_manifest.read_manifest(s3, settings.s3_bucket, slot)
        assert manifest is not None, day
        found[day] = manifest
    return found


def range_run(days: list[str], config: Path | None = None) -> dg.DagsterRun:
    """Reprocess ``days`` as one run and return it (the only run of this instance over that range)."""
    result = reprocess_range(days[0], days[-1], {"kappa/version": "2"}, config=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={RANGE_START: days[0], RANGE_END: days[-1]}))
        return runs[0]


def assert_range_reported(s3: Any, settings: Settings, run: dg.DagsterRun, days: list[str]) -> None:
    """One topic and group for every day; each day checked green on its own and equal to plain polars."""
    assert run.status == dg.DagsterRunStatus.SUCCESS
    found = manifests(s3, settings, days)
    assert len({(m.replay_topic, m.group) for m in found.values()}) == 1
    assert all(m.range_days == days and m.status == "reported" and m.cleaned for m in found.values())
    assert len({m.replay_id for m in found.values()}) == len(days)  # each day keeps its own manifest
    with dg.DagsterInstance.get() as instance:
        assert day_check_results(instance, run.run_id) == {day: GREEN for day in days}
        for day in days:
            meta = materialization_metadata(instance, "corrected_report", day)
            assert meta["status"] == "reported" and meta["replay_id"] == found[day].replay_id
            assert meta["dagster/row_count"] == report(s3, settings, 2, day).height
    for day in days:
        expected = orders_report(archive(s3, settings, day), version=2)
        assert_frame_equal(report(s3, settings, 2, day), expected, check_exact=False, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("days", "per_day"),
    [pytest.param(DAYS, 800, id="3-days"), pytest.param(WEEK, 3000, marks=pytest.mark.soak, id="week")],
)
def test_days_in_one_run_equal_the_one_day_replays(
    settings: Settings, s3: Any, dagster_home: Any, days: list[str], per_day: int  # noqa: F811
) -> None:
    write_days(s3, settings.s3_bucket, settings.events_topic, days, per_day)
    run = range_run(days)
    assert_range_reported(s3, settings, run, days)
    in_one_run = {day: report(s3, settings, 2, day) for day in days}
    range_topic = manifests(s3, settings, days)[days[0]].replay_topic

    for day in days:  # the one-day replay of each day (its own topic and group) writes the same report
        single = publish_replay(settings, s3, 2, day, force=True)
        assert single.range_id is None and single.replay_topic != range_topic
        assert_frame_equal(report(s3, settings, 2, day), in_one_run[day])


def test_two_consumers_in_the_group_give_the_same_reports(
    settings: Settings, s3: Any, dagster_home: Any, tmp_path: Path  # noqa: F811
) -> None:
    """``replay.consumers: 2``: both members share the work and every day's report equals plain polars
    over its archive (what one consumer writes too: see the test above)."""
    write_days(s3, settings.s3_bucket, settings.events_topic, DAYS, 8000)
    # small batches keep the first member busy for seconds, so the second joins while there is work
    # left (the broker rebalances at once)
    options = {"consumers": 2, "processor_args": "--batch-size 20 --checkpoint-seconds 0.2"}
    config = tmp_path / "two.yaml"
    config.write_text(json.dumps({"resources": {"replay": {"config": options}}}))
    run = range_run(DAYS, config=config)
    assert_range_reported(s3, settings, run, DAYS)
    with dg.DagsterInstance.get() as instance:
        consume = materialization_metadata(instance, "replay_consume", DAYS[0])
    total = sum(m.records or 0 for m in manifests(s3, settings, DAYS).values())
    member_one = consume["processor_result"]  # the Pipes member's own count: the other member did the rest
    assert member_one["complete"] and 0 < member_one["records"] < total, (member_one["records"], total)
