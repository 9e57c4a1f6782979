"""End to end through Dagster: `dagster job execute` (CLI) and the nightly schedule's run request,
on three days of archive data with duplicates, late and malformed records, with live v1 running."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
from typing import Any

import dagster as dg
import pytest
from dagster_e2e import (
    archive,
    check_results,
    latest_run,
    materialization_metadata,
    object_keys,
    pids_running,
    produce_records,
    report,
    reprocess,
    start_processor,
    stop,
    wait_for,
)
from dagster_env import DAGSTER, ROOT, dagster_home, fresh_resources  # noqa: F401  (fixture)
from polars.testing import assert_frame_equal
from replay_data import day_records, orders_report, write_day, write_days

from workers import kafka as kafka_helpers
from workers import keys
from workers.config import Settings
from workers.lag import LagReader
from workers.processor.results import live_results
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest

pytestmark = pytest.mark.slow
DAYS = ["2026-11-20", "2026-11-21", "2026-11-22"]
GREEN = {"report_matches_reference": True, "records_accounted": True, "report_matches_batch": True}


def run_live_v1(settings: Settings, frame: Any) -> None:
    """Live v1 over the same records (the faulty version users read today), stopped once caught up."""
    kafka_helpers.ensure_topic(settings, settings.events_topic, 3)
    produce_records(settings, settings.events_topic, frame)
    live = start_processor("--pipeline", "orders", "--version", "1", "--start", "earliest")
    end = {int(p): int(o) for p, o in kafka_helpers.end_offsets(settings, settings.events_topic).items()}
    reader, group = LagReader(settings), keys.live_group("orders", 1, prefix=settings.group_prefix)
    try:
        wait_for(
            lambda: reader.group_lag(group, settings.events_topic, end).lag == 0,
            120,
            "live v1 to catch up",
        )
    finally:
        stop(live)


def assert_day_correct(s3: Any, settings: Settings, instance: dg.DagsterInstance, day: str) -> None:
    expected = orders_report(archive(s3, settings, day), version=2)
    assert_frame_equal(report(s3, settings, 2, day), expected, check_exact=False, rel_tol=1e-12)
    run = latest_run(instance, day)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert check_results(instance, run.run_id) == GREEN


def test_three_days_reprocessed_with_v2_equal_plain_polars(
    settings: Settings,
    s3: Any,
    dagster_home: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frame = write_days(s3, settings.s3_bucket, settings.events_topic, DAYS, 1500)
    run_live_v1(settings, frame)
    assert not live_results(s3, settings.s3_bucket, "orders", 1, DAYS[0]).is_empty()

    # entry point 1: the CLI, version by tag for one day and by default for the next
    for day, tags in ((DAYS[0], {"kappa/version": "2"}), (DAYS[1], {})):
        result = reprocess(day, tags)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # entry point 3: the nightly schedule's run request for the tick after the last day, executed
    from kappa_dagster.defs.schedules.nightly_reprocess import nightly_reprocess

    monkeypatch.setenv("KAPPA_NIGHTLY_DAYS", "1")
    tick = dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.UTC)
    (request,) = nightly_reprocess(
        dg.build_schedule_context(scheduled_execution_time=tick, resources=fresh_resources())
    )
    assert request.partition_key == DAYS[2]
    result = reprocess(request.partition_key, dict(request.tags))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with dg.DagsterInstance.get() as instance:
        for day in DAYS:
            assert_day_correct(s3, settings, instance, day)
            meta = materialization_metadata(instance, "corrected_report", day)
            assert meta["version"] == 2 and meta["live_version"] == 1
            assert meta["live_windows_changed"] > 0  # v1 counted duplicates (and dropped late records)
            assert meta["dagster/row_count"] == report(s3, settings, 2, day).height
            load = materialization_metadata(instance, "replay_load", day)
            assert load["duplicates_dropped"] > 0 and load["topic"].startswith(f"{settings.events_topic}.replay.")
    # replays cleaned up after themselves
    topics = kafka_helpers.admin_client(settings).list_topics(timeout=10).topics
    assert not [t for t in topics if t.startswith(f"{settings.events_topic}.replay.")]
    assert not object_keys(s3, settings, "_state/processor/orders/v2/")

    # re-running a day is idempotent: same report, the load is reused
    before = report(s3, settings, 2, DAYS[0])
    result = reprocess(DAYS[0])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_frame_equal(report(s3, settings, 2, DAYS[0]), before)
    with dg.DagsterInstance.get() as instance:
        assert materialization_metadata(instance, "replay_load", DAYS[0])["reused"] is True


def test_killing_the_replay_consumer_then_rerunning_gives_the_same_report(
    settings: Settings,
    s3: Any,
    dagster_home: Any,  # noqa: F811
    tmp_path: Any,
) -> None:
    day = DAYS[0]
    write_day(s3, settings.s3_bucket, settings.events_topic, day, day_records(day, 20_000, partitions=3))
    spec = replay_loader.ReplaySpec("orders", 2, day, settings.events_topic, settings.s3_bucket)
    slow = tmp_path / "slow.yaml"  # small batches + frequent checkpoints: the kill lands mid-run
    slow.write_text(
        json.dumps(
            {"resources": {"replay": {"config": {"processor_args": "--batch-size 100 --checkpoint-seconds 0.2"}}}}
        )
    )
    command = [
        DAGSTER,
        "job",
        "execute",
        "-m",
        "kappa_dagster",
        "-j",
        "reprocess",
        "-c",
        str(slow),
        "--tags",
        json.dumps({"dagster/partition": day}),
    ]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # each run loads under its own replay id: its group and checkpoints are named in the manifest
        wait_for(lambda: _consuming(s3, settings, spec) or job.poll() is not None, 180, "a checkpoint")
        manifest = replay_manifest.read_manifest(s3, settings.s3_bucket, spec.slot)
        assert manifest is not None
        victims = pids_running(manifest.group)
        assert victims, "the replay consumer finished before it could be killed"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, output[-2000:]
    assert not object_keys(s3, settings, keys.report_file("orders", 2, day))

    result = reprocess(day)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = orders_report(archive(s3, settings, day), version=2)
    assert_frame_equal(report(s3, settings, 2, day), expected, check_exact=False, rel_tol=1e-12)
    with dg.DagsterInstance.get() as instance:
        run = latest_run(instance, day)
        assert check_results(instance, run.run_id) == GREEN


def _consuming(s3: Any, settings: Settings, spec: replay_loader.ReplaySpec) -> bool:
    manifest = replay_manifest.read_manifest(s3, settings.s3_bucket, spec.slot)
    prefix = f"{manifest.processor_prefix}_state/part=" if manifest else None
    return bool(prefix and manifest.status == "loaded" and object_keys(s3, settings, prefix))


@pytest.mark.parametrize(
    ("day", "tags", "message"),
    [
        ("2026-11-24", {}, "nothing to replay for 2026-11-24"),
        ("2026-13-45", {}, "2026-13-45"),
        ("../", {}, "../"),
        (DAYS[0], {"kappa/version": "99"}, "has no version 99"),
    ],
    ids=["no-data", "not-a-date", "traversal", "bad-version"],
)
def test_bad_requests_fail_clearly_and_write_nothing(
    settings: Settings,
    s3: Any,
    dagster_home: Any,  # noqa: F811
    day: str,
    tags: dict[str, str],
    message: str,
) -> None:
    write_day(s3, settings.s3_bucket, settings.events_topic, DAYS[0], day_records(DAYS[0], 50))
    before = object_keys(s3, settings)
    result = reprocess(day, tags, timeout=120)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert object_keys(s3, settings) == before  # no manifest, no report
    topics = kafka_helpers.admin_client(settings).list_topics(timeout=10).topics
    assert not [t for t in topics if t.startswith(f"{settings.events_topic}.replay.")]
