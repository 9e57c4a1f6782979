"""The gate end to end through `dagster job execute`: a logic bug is caught, and one replay per day.

* A pipeline version whose streaming code differs from its SQL definition (``tests/buggy_pipelines``:
  refunds counted as purchases) fails the blocking ``report_matches_reference`` check; its replay
  is ``rejected`` (never ``reported``) and both promote paths refuse it, naming the day.
* Two reprocess runs of the same day at once: the second fails at once with a message naming the
  first run, and does not touch the first run's topic or group; the first run's report is correct.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import dagster as dg
import pytest
from buggy_pipelines import BUGGY_VERSION
from dagster_e2e import archive, check_results, latest_run, report, reprocess, wait_for
from dagster_env import DAGSTER, ROOT, dagster_cli, dagster_home, fresh_resources  # noqa: F401  (fixture)
from polars.testing import assert_frame_equal
from replay_data import day_records, orders_report, write_day

from workers import kafka as kafka_helpers
from workers import promote
from workers.config import Settings
from workers.errors import KappaError
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest

pytestmark = pytest.mark.slow
DAY = "2026-11-20"
TESTS = str(ROOT / "tests")


@pytest.fixture
def buggy_pipeline(monkeypatch: pytest.MonkeyPatch) -> int:
    """orders v7 registered here and in every process Dagster starts (env var + tests/ on the path)."""
    monkeypatch.setenv("KAPPA_PIPELINE_MODULES", "buggy_pipelines")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
    return BUGGY_VERSION


def manifest_of(s3: Any, settings: Settings, version: int) -> replay_manifest.ReplayManifest:
    slot = replay_manifest.replay_id("orders", version, DAY, settings.s3_bucket, settings.events_topic)
    manifest = replay_manifest.read_manifest(s3, settings.s3_bucket, slot)
    assert manifest is not None
    return manifest


def test_a_logic_bug_fails_the_gate_and_cannot_be_promoted(
    settings: Settings,
    s3: Any,
    dagster_home: Any,  # noqa: F811
    buggy_pipeline: int,
) -> None:
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, day_records(DAY, 1500, partitions=3))
    result = reprocess(DAY, {"kappa/version": str(buggy_pipeline)})
    assert result.returncode != 0
    assert "report_matches_reference" in result.stdout + result.stderr, result.stderr[-6000:]

    with dg.DagsterInstance.get() as instance:
        run = latest_run(instance, DAY)
        assert run.status == dg.DagsterRunStatus.FAILURE
        # the engine agrees with itself (same buggy code in batch mode): only the SQL reference sees it
        assert check_results(instance, run.run_id) == {"report_matches_reference": False, "records_accounted": True}
    manifest = manifest_of(s3, settings, buggy_pipeline)
    assert manifest.status == "rejected" and manifest.failed_checks == ["report_matches_reference"]
    assert not replay_manifest.published(s3, settings.s3_bucket, manifest)
    written = report(s3, settings, buggy_pipeline, DAY)  # the file is there, for review, but unpublished
    assert "refund" not in written["type"].to_list()

    with pytest.raises(KappaError, match=f"{DAY}: checks failed: report_matches_reference"):
        promote.promote(s3, settings.s3_bucket, settings.events_topic, "orders", buggy_pipeline)
    cli = subprocess.run(
        [sys.executable, "-m", "workers.cli", "promote", "--version", str(buggy_pipeline)],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=120,
    )
    assert cli.returncode != 0 and f"{DAY}: checks failed" in cli.stdout + cli.stderr
    from kappa_dagster import defs

    with dg.DagsterInstance.get() as instance:
        config = {"ops": {"promote_version": {"config": {"pipeline": "orders", "version": buggy_pipeline}}}}
        job = defs.resolve_job_def("promote").execute_in_process(
            run_config=config, instance=instance, resources=fresh_resources(), raise_on_error=False
        )
        assert not job.success
    assert promote.read_current(s3, settings.s3_bucket, "orders") is None

    # the same day with the correct v2 passes the same gate and can be promoted
    result = reprocess(DAY, {"kappa/version": "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert manifest_of(s3, settings, 2).status == "reported"
    refused = promote.refused_days(s3, settings.s3_bucket, "orders", 2, settings.events_topic)
    assert refused == {}
    replay_loader.cleanup(settings, manifest)  # the rejected replay keeps its topic for review: drop it here


def test_two_reprocess_runs_of_one_day_one_fails_cleanly_the_other_is_correct(
    settings: Settings,
    s3: Any,
    dagster_home: Any,  # noqa: F811
    tmp_path: Any,
) -> None:
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, day_records(DAY, 3000, partitions=3))
    slow = tmp_path / "slow.yaml"  # a throttled load keeps the first run busy while the second starts
    slow.write_text(json.dumps({"resources": {"replay": {"config": {"throttle": 150}}}}))
    tags = json.dumps({"dagster/partition": DAY})
    command = [DAGSTER, "job", "execute", "-m", "kappa_dagster", "-j", "reprocess", "--tags", tags]
    first = subprocess.Popen(
        [*command, "-c", str(slow)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: _loading(s3, settings) or first.poll() is not None, 120, "the first run to start loading")
        assert first.poll() is None, "the first run finished before the second could start"
        loading = manifest_of(s3, settings, 2)
        second = dagster_cli("job", "execute", "-m", "kappa_dagster", "-j", "reprocess", "--tags", tags, timeout=300)
        assert second.returncode != 0
        output = second.stdout + second.stderr
        assert f"the replay of orders v2 for {DAY} is already running in dagster-run:" in output
        # the second run touched nothing of the first: same manifest version, its topic still there
        assert manifest_of(s3, settings, 2).replay_id == loading.replay_id
        topics = kafka_helpers.admin_client(settings).list_topics(timeout=10).topics
        assert loading.replay_topic in topics
        output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output[-3000:]
    manifest = manifest_of(s3, settings, 2)
    assert manifest.status == "reported" and manifest.replay_id == loading.replay_id
    expected = orders_report(archive(s3, settings, DAY), version=2)
    assert_frame_equal(report(s3, settings, 2, DAY), expected, check_exact=False, rel_tol=1e-12)
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": DAY}))
        assert sorted(r.status.value for r in runs) == ["FAILURE", "SUCCESS"]
        (ok,) = [r for r in runs if r.status == dg.DagsterRunStatus.SUCCESS]
        assert all(check_results(instance, ok.run_id).values())
    # the lease is released once the report is checked: a later run of the day is free to start
    assert not [k for k in _keys(s3, settings) if k.endswith("/lease.json")]


def _loading(s3: Any, settings: Settings) -> bool:
    slot = replay_manifest.replay_id("orders", 2, DAY, settings.s3_bucket, settings.events_topic)
    manifest = replay_manifest.read_manifest(s3, settings.s3_bucket, slot)
    return bool(manifest and manifest.status == "loading")


def _keys(s3: Any, settings: Settings) -> list[str]:
    from workers import s3 as s3_helpers

    return [obj["Key"] for obj in s3_helpers.iter_keys(s3, settings.s3_bucket, "_state/replays/")]


def test_a_new_load_is_never_reported_with_the_previous_loads_report(
    settings: Settings,
    s3: Any,
    dagster_home: Any,  # noqa: F811
) -> None:
    """The state a bounded processor leaves when it dies after its last checkpoint, before writing
    reports: the new load's group is at the end, the old load's report.parquet still in place."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    from kappa_dagster.defs.sensors.replay_progress import replay_progress_sensor

    frame = day_records(DAY, 1200, partitions=2)
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, frame)
    assert reprocess(DAY).returncode == 0
    old = manifest_of(s3, settings, 2)
    assert old.status == "reported"
    # late records of DAY are archived: the day is stale, promote refuses it
    late = day_records(DAY, 200, partitions=2, seed=9, start_offset=5000)
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, late, overlap=False)
    refused = promote.refused_days(s3, settings.s3_bucket, "orders", 2, settings.events_topic)
    assert refused == {DAY: "the archive changed since its checks (stale): reprocess it"}

    load = dagster_cli(
        "asset", "materialize", "-m", "kappa_dagster", "--select", "replay_load", "--partition", DAY, timeout=300
    )
    assert load.returncode == 0, load.stderr[-3000:]
    new = manifest_of(s3, settings, 2)
    assert new.status == "loaded" and new.replay_id != old.replay_id
    offsets = [TopicPartition(new.replay_topic, int(p), int(o)) for p, o in new.end_offsets.items()]
    admin = kafka_helpers.admin_client(settings)
    admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(new.group, offsets)])[new.group].result()

    with dg.DagsterInstance.get() as instance:
        sensed = replay_progress_sensor(dg.build_sensor_context(instance=instance, resources=fresh_resources()))
        assert not sensed.run_requests  # at the end, but never consumed: no report run
    gate = dagster_cli(
        "job", "execute", "-m", "kappa_dagster", "-j", "corrected_report_job", "--tags",
        json.dumps({"dagster/partition": DAY}), timeout=300,
    )
    assert gate.returncode != 0 and "is loaded, not consumed" in gate.stdout + gate.stderr
    assert manifest_of(s3, settings, 2).status == "loaded"  # never "reported" with the old file

    # the next reprocess does not skip the day: it consumes the new load and publishes the new data
    assert reprocess(DAY).returncode == 0
    final = manifest_of(s3, settings, 2)
    assert final.status == "reported" and final.replay_id == new.replay_id
    expected = orders_report(archive(s3, settings, DAY), version=2)
    assert expected["events"].sum() > orders_report(frame, version=2)["events"].sum()
    assert_frame_equal(report(s3, settings, 2, DAY), expected, check_exact=False, rel_tol=1e-12)
    assert promote.refused_days(s3, settings.s3_bucket, "orders", 2, settings.events_topic) == {}
