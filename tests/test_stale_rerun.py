"""Late data re-runs a day, driven by the real dagster-daemon (as the GraphQL test drives it).

A day is reprocessed and reported; then late records of that day land in its archive prefix. The
raw_archive sensor observes the new fingerprint (the day's data version), the UI shows the day's
corrected report as stale, the sensor re-runs the day by itself (one run for that fingerprint), and
the new report matches the independent computation over the changed archive again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster_e2e import archive, report, wait_for
from dagster_env import dagster_home, fresh_resources  # noqa: F401  (fixture)
from dagster_graphql import DagsterGraphQLClient
from polars.testing import assert_frame_equal
from replay_data import checked_manifest, day_records, orders_report, write_day, write_days
from test_dagster_graphql import dagster_services  # noqa: F401  (fixture)

from workers import keys
from workers.archive import stats as archive_stats
from workers.config import Settings
from workers.replay import manifest as replay_manifest

DAY = "2026-11-20"
STALE_STATUS = """
query Stale($day: String!) {
  assetNodes(assetKeys: [{path: ["corrected_report"]}]) { staleStatusByPartition(partitions: [$day]) }
}
"""
DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[int]:
    """The webserver + daemon, with the archive sensor ticking every few seconds."""
    monkeypatch.setenv("KAPPA_ARCHIVE_SENSOR_SECONDS", "3")
    yield request.getfixturevalue("dagster_services")


def stale_status(client: DagsterGraphQLClient) -> str:
    return client._execute(STALE_STATUS, {"day": DAY})["assetNodes"][0]["staleStatusByPartition"][0]


def runs(instance: dg.DagsterInstance, **tags: str) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": DAY, **tags})))


def reported_manifest(s3: Any, settings: Settings) -> replay_manifest.ReplayManifest:
    rid = replay_manifest.replay_id("orders", 2, DAY, settings.s3_bucket, settings.events_topic)
    manifest = replay_manifest.read_manifest(s3, settings.s3_bucket, rid)
    assert manifest is not None
    return manifest


@pytest.mark.slow
def test_late_data_turns_the_day_stale_and_the_daemon_reruns_it(
    settings: Settings,
    s3: Any,
    daemon: int,
    dagster_home: Path,  # noqa: F811
) -> None:
    write_days(s3, settings.s3_bucket, settings.events_topic, [DAY], 400)
    client = DagsterGraphQLClient("127.0.0.1", port_number=daemon)
    first = client.submit_job_execution(
        "reprocess", tags={"dagster/partition": DAY, "kappa/version": "2"}, repository_location_name="kappa_dagster"
    )
    wait_for(lambda: client.get_run_status(first) in DONE, 180, "the first reprocess run", interval=2)
    assert client.get_run_status(first) == dg.DagsterRunStatus.SUCCESS
    before = archive_stats.day_fingerprint(s3, settings.s3_bucket, settings.events_topic, DAY)
    assert reported_manifest(s3, settings).archive_fingerprint == before
    wait_for(lambda: stale_status(client) == "FRESH", 60, "the reported day to be fresh", interval=1)

    # late records of the day land in its prefix (a later archiver flush: new offsets, same dt=)
    late = day_records(DAY, 60, seed=99, start_offset=10_000)
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, late, overlap=False)
    after = archive_stats.day_fingerprint(s3, settings.s3_bucket, settings.events_topic, DAY)
    assert after != before
    wait_for(lambda: stale_status(client) == "STALE", 60, "the UI to show the day's report as stale", interval=0.5)

    with dg.DagsterInstance.get() as instance:
        wait_for(lambda: runs(instance, **{"kappa/stale": after}), 90, "the daemon's re-run of the stale day")
        (rerun,) = runs(instance, **{"kappa/stale": after})
        assert rerun.tags["kappa/version"] == "2" and rerun.tags["dagster/sensor_name"] == "raw_archive_sensor"
        wait_for(lambda: instance.get_run_by_id(rerun.run_id).status in DONE, 240, "the re-run", interval=2)
        assert instance.get_run_by_id(rerun.run_id).status == dg.DagsterRunStatus.SUCCESS
        wait_for(lambda: stale_status(client) == "FRESH", 60, "the day to be fresh again", interval=1)
        # one fingerprint, one run: later ticks see the report computed from it and request nothing
        time.sleep(8)  # two more sensor ticks
        assert len(runs(instance, **{"kappa/stale": after})) == 1
    assert reported_manifest(s3, settings).archive_fingerprint == after
    changed = archive(s3, settings, DAY)
    assert changed.height > late.height
    assert_frame_equal(
        report(s3, settings, 2, DAY), orders_report(changed, version=2), check_exact=False, rel_tol=1e-12
    )


def test_sensor_reruns_a_stale_day_once_its_archive_settled_and_caps_runs_per_tick(
    settings: Settings,
    s3: Any,
    dagster_home: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kappa_dagster.defs.sensors.raw_archive import raw_archive_sensor

    monkeypatch.setenv("KAPPA_STALE_RUNS_PER_TICK", "2")
    bucket, topic = settings.s3_bucket, settings.events_topic
    days = ["2026-11-20", "2026-11-21", "2026-11-22"]
    write_days(s3, bucket, topic, days, 30)
    for version, day in ((2, days[0]), (2, days[1]), (2, days[2]), (1, days[0])):
        manifest = checked_manifest(
            bucket,
            topic,
            version,
            day,
            started_at="2026-12-01T00:00:00+00:00",
            archive_fingerprint=archive_stats.day_fingerprint(s3, bucket, topic, day),
        )
        replay_manifest.write_manifest(s3, bucket, manifest)

    def tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(instance=instance, resources=fresh_resources(), cursor=cursor)
        return raw_archive_sensor(context)

    with dg.DagsterInstance.get() as instance:
        first = tick(None)
        assert len(first.asset_events) == 3 and not first.run_requests  # all fresh: observed only
        for day in days:  # late records land in every day
            write_day(s3, bucket, topic, day, day_records(day, 5, seed=7, start_offset=5_000), overlap=False)
        second = tick(first.cursor)
        assert len(second.asset_events) == 3 and not second.run_requests  # changed, not settled yet
        third = tick(second.cursor)
        assert not third.asset_events
        assert len(third.run_requests) == 2  # the per-tick cap
        request = third.run_requests[0]
        after = archive_stats.day_fingerprint(s3, bucket, topic, days[0])
        assert request.partition_key == days[0] and request.run_key == f"stale:orders:{days[0]}:{after}"
        assert request.tags["kappa/version"] == "2"  # the newest version that reported the day
        tags = request.tags
        assert tags["kappa/stale"] == after and tags["kappa/pipeline"] == "orders"
        # the promoted version goes first when it reported the day
        pointer = {"pipeline": "orders", "version": 1, "reports_prefix": "reports/orders/v1/", "days": [days[0]]}
        s3.put_object(Bucket=bucket, Key=keys.current_pointer("orders"), Body=json.dumps(pointer).encode())
        again = tick(second.cursor)
        assert again.run_requests[0].tags["kappa/version"] == "1"
