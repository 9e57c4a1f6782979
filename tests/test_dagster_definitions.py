"""The code location loads and validates; version/day resolution, schedule, sensor and promote in process."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import dagster as dg
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from dagster_env import dagster_cli, dagster_home, fresh_resources  # noqa: F401  (fixture)
from replay_data import checked_manifest, day_records, write_day

from kappa_dagster.defs.resources import KappaResource
from kappa_dagster.replay.target import resolve
from workers import kafka as kafka_helpers
from workers import keys, promote
from workers.archive import stats as archive_stats
from workers.config import Settings, load_settings
from workers.errors import ConfigError, KappaError
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest

DAY = "2026-11-20"


def test_definitions_load_with_every_job_sensor_and_schedule() -> None:
    from kappa_dagster import defs

    dg.Definitions.validate_loadable(defs)
    for job in ("reprocess", "corrected_report_job", "promote", "rollback", "late_share_check"):
        assert defs.resolve_job_def(job) is not None
    assert defs.resolve_sensor_def("replay_progress_sensor") and defs.resolve_sensor_def("raw_archive_sensor")
    assert defs.resolve_schedule_def("nightly_reprocess")
    keys_ = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    assert {"raw_archive", "replay_load", "replay_consume", "corrected_report"} <= keys_
    checks = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"report_matches_reference", "records_accounted", "report_matches_batch", "live_late_share"}
    blocking = {spec.name for spec in defs.resolve_assets_def("corrected_report").check_specs if spec.blocking}
    assert blocking == {"report_matches_reference", "records_accounted"}
    reprocess = defs.resolve_job_def("reprocess")
    assert reprocess.tags["kappa/replay"] == "true"


def test_dagster_cli_validates_the_workspace(dagster_home: Any) -> None:  # noqa: F811
    result = dagster_cli("definitions", "validate", "-w", "workspace.yaml")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("tags", "day", "config_version", "message"),
    [
        ({}, "../", None, "YYYY-MM-DD"),
        ({}, "2026-13-45", None, "calendar"),
        ({"kappa/version": "99"}, DAY, None, "has no version 99"),
        ({"kappa/version": "two"}, DAY, None, "not a positive integer"),
        ({"kappa/pipeline": "nope"}, DAY, None, "unknown pipeline"),
        ({"kappa/version": "1"}, DAY, 2, "given twice"),
    ],
)
def test_bad_targets_fail_with_one_clear_message(tags: dict, day: str, config_version: Any, message: str) -> None:
    with pytest.raises(KappaError, match=message):
        resolve(tags, day, version=config_version)


def test_version_comes_from_tag_then_config_then_default() -> None:
    assert resolve({}, DAY).version == 2
    assert resolve({"kappa/version": "1"}, DAY).version == 1
    assert resolve({}, DAY, version=1).version == 1
    assert resolve({"kappa/version": "v2"}, DAY, version=2).version == 2


def test_schedule_requests_one_run_per_recent_day(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from kappa_dagster import defs
    from kappa_dagster.defs.schedules.nightly_reprocess import nightly_reprocess

    monkeypatch.setenv("KAPPA_NIGHTLY_DAYS", "3")
    tick = dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.UTC)
    context = dg.build_schedule_context(scheduled_execution_time=tick, resources=fresh_resources())
    requests = nightly_reprocess(context)
    assert [r.partition_key for r in requests] == ["2026-11-20", "2026-11-21", "2026-11-22"]
    assert all(r.tags["kappa/version"] == "2" and r.run_key.startswith("nightly:2026-11-23") for r in requests)
    job = defs.resolve_job_def("reprocess")
    for request in requests:
        assert dg.validate_run_config(job, request.run_config) is not None


def _loaded_replay(settings: Settings, s3: Any) -> ReplayManifest:
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, day_records(DAY, 120, partitions=2))
    spec = replay_loader.ReplaySpec("orders", 2, DAY, settings.events_topic, settings.s3_bucket, partitions=2)
    return replay_loader.load(settings, spec, client=s3).manifest


def _commit(settings: Settings, manifest: ReplayManifest, fraction: float) -> None:
    offsets = [
        TopicPartition(manifest.replay_topic, int(p), int(o * fraction)) for p, o in manifest.end_offsets.items()
    ]
    admin = kafka_helpers.admin_client(settings)
    request = ConsumerGroupTopicPartitions(manifest.group, offsets)
    admin.alter_consumer_group_offsets([request])[manifest.group].result()


def test_progress_sensor_observes_lag_and_requests_the_report_at_the_end(
    settings: Settings,
    s3: Any,
    dagster_home: Any,  # noqa: F811
) -> None:
    from kappa_dagster.defs.sensors.replay_progress import replay_progress_sensor

    manifest = _loaded_replay(settings, s3)
    try:
        with dg.instance_for_test() as instance:
            _commit(settings, manifest, 0.5)
            context = dg.build_sensor_context(instance=instance, resources=fresh_resources())
            result = replay_progress_sensor(context)
            assert not result.run_requests
            (observed,) = result.asset_events
            assert observed.asset_key.to_user_string() == "replay_consume" and observed.partition == DAY
            assert 0 < observed.metadata["percent_done"].value < 100
            assert observed.metadata["lag"].value > 0

            _commit(settings, manifest, 1.0)
            context = dg.build_sensor_context(instance=instance, resources=fresh_resources(), cursor=result.cursor)
            result = replay_progress_sensor(context)
            # at the end, but its consume step never succeeded (status still loaded): no report run
            assert not result.run_requests
            assert result.asset_events[0].metadata["percent_done"].value == 100.0
            manifest.status, manifest.report_etag = "consumed", '"abc"'
            replay_manifest.write_manifest(s3, settings.s3_bucket, manifest)
            context = dg.build_sensor_context(instance=instance, resources=fresh_resources(), cursor=result.cursor)
            result = replay_progress_sensor(context)
            (request,) = result.run_requests
            assert request.partition_key == DAY and request.tags["kappa/version"] == "2"
            assert request.run_key.startswith(f"report:{manifest.replay_id}")
            # reported replays are left alone
            manifest.status = "reported"
            replay_manifest.write_manifest(s3, settings.s3_bucket, manifest)
            context = dg.build_sensor_context(instance=instance, resources=fresh_resources(), cursor=result.cursor)
            assert not replay_progress_sensor(context).run_requests
    finally:
        replay_loader.cleanup(settings, manifest)


def test_raw_archive_sensor_observes_objects_bytes_rows(settings: Settings, s3: Any, dagster_home: Any) -> None:  # noqa: F811
    from kappa_dagster.defs.sensors.raw_archive import raw_archive_sensor

    written = write_day(s3, settings.s3_bucket, settings.events_topic, DAY, day_records(DAY, 90, partitions=2))
    with dg.instance_for_test() as instance:
        result = raw_archive_sensor(dg.build_sensor_context(instance=instance, resources=fresh_resources()))
        (observed,) = result.asset_events
        assert observed.partition == DAY and observed.metadata["objects"].value == written
        assert observed.metadata["rows"].value >= 90  # overlapping files repeat a few rows
        again = dg.build_sensor_context(instance=instance, resources=fresh_resources(), cursor=result.cursor)
        assert not raw_archive_sensor(again).asset_events  # unchanged prefix: no new observation


def published_manifest(s3: Any, bucket: str, topic: str, version: int, ends: dict[str, int]) -> ReplayManifest:
    """What the gate leaves behind for a checked day: status reported, snapshot fingerprint, report ETag.

    (The gate itself runs for real in tests/test_dagster_gate.py; here only the pointer mechanics count.)
    """
    if not archive_stats.days_listing(s3, bucket, topic):
        write_day(s3, bucket, topic, DAY, day_records(DAY, 20, partitions=2))
    report_key = keys.report_file("orders", version, DAY)
    etag = s3.put_object(Bucket=bucket, Key=report_key, Body=b"checked")["ETag"]
    manifest = checked_manifest(
        bucket,
        topic,
        version,
        DAY,
        source_end_offsets=ends,
        report_key=report_key,
        report_etag=etag,
        checked_fingerprint=archive_stats.day_fingerprint(s3, bucket, topic, DAY),
    )
    replay_manifest.write_manifest(s3, bucket, manifest)
    return manifest


def test_promote_and_rollback_are_single_pointer_writes(settings: Settings, s3: Any) -> None:
    bucket, topic = settings.s3_bucket, settings.events_topic
    with pytest.raises(KappaError, match="no corrected reports"):
        promote.promote(s3, bucket, topic, "orders", 2)
    assert promote.read_current(s3, bucket, "orders") is None
    for version, ends in ((1, {"0": 10, "1": 7}), (2, {"0": 12, "1": 7})):
        published_manifest(s3, bucket, topic, version, ends)
    # placeholder report bodies: no version diff (test_version_diff covers it)
    first = promote.promote(s3, bucket, topic, "orders", 1, max_unexplained=None)
    second = promote.promote(s3, bucket, topic, "orders", 2, max_unexplained=None)
    assert second["live_start_offsets"] == {"0": 12, "1": 7} and second["days"] == [DAY]
    assert [h["version"] for h in second["history"]] == [1]
    assert json.loads(promote.start_offsets_arg(second)) == {"0": 12, "1": 7}
    stored = json.loads(s3.get_object(Bucket=bucket, Key=keys.current_pointer("orders"))["Body"].read())
    assert stored["version"] == 2
    restored = promote.rollback(s3, bucket, "orders")
    assert restored is not None and restored["version"] == 1 and restored["promoted_at"] == first["promoted_at"]
    assert promote.rollback(s3, bucket, "orders") is None
    assert promote.read_current(s3, bucket, "orders") is None
    with pytest.raises(KappaError, match="nothing to roll back"):
        promote.rollback(s3, bucket, "orders")


def test_promote_and_rollback_jobs(settings: Settings, s3: Any, dagster_home: Any) -> None:  # noqa: F811
    from kappa_dagster import defs

    bucket, topic = settings.s3_bucket, settings.events_topic
    published_manifest(s3, bucket, topic, 2, {"0": 5})
    with dg.instance_for_test() as instance:
        # a placeholder report body: no version diff (test_version_diff covers it)
        config = {"ops": {"promote_version": {"config": {"pipeline": "orders", "version": 2, "max_unexplained": None}}}}
        promoted = defs.resolve_job_def("promote").execute_in_process(
            run_config=config, instance=instance, resources=fresh_resources()
        )
        assert promoted.success
        assert promote.read_current(s3, bucket, "orders")["live_start_offsets"] == {"0": 5}
        bad = {"ops": {"promote_version": {"config": {"pipeline": "orders", "version": 1}}}}
        failed = defs.resolve_job_def("promote").execute_in_process(
            run_config=bad, instance=instance, resources=fresh_resources(), raise_on_error=False
        )
        assert not failed.success and promote.current_version(s3, bucket, "orders") == 2
        rolled = defs.resolve_job_def("rollback").execute_in_process(instance=instance, resources=fresh_resources())
        assert rolled.success and promote.read_current(s3, bucket, "orders") is None


def _stack_env_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stack env file of its own, and none of the variables it names in the environment."""
    (tmp_path / "stack.env").write_text("KAPPA_BOOTSTRAP_SERVERS=from-file:9092\nKAPPA_S3_ENDPOINT_URL=http://from-file\n")
    monkeypatch.setenv("KAPPA_STACK_DIR", str(tmp_path))
    for name in ("KAPPA_BOOTSTRAP_SERVERS", "KAPPA_S3_ENDPOINT_URL", "KAPPA_S3_BUCKET", "KAPPA_NO_STACK_ENV"):
        monkeypatch.delenv(name, raising=False)


def test_importing_the_code_location_changes_no_environment_variable(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    _stack_env_file(tmp_path, monkeypatch)
    ours = "{k: v for k, v in os.environ.items() if k.startswith(('KAPPA_', 'AWS_'))}"
    script = f"import os; before = {ours}; import kappa_dagster; print(before == {ours})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True"  # polars sets a malloc variable: not ours


def test_resource_settings_come_from_fields_then_environment_then_stack_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    _stack_env_file(tmp_path, monkeypatch)
    before = dict(os.environ)
    plain = KappaResource().settings()
    assert (plain.bootstrap_servers, plain.s3_endpoint_url) == ("from-file:9092", "http://from-file")
    assert plain.s3_bucket == "kappa"  # workers.config's default
    monkeypatch.setenv("KAPPA_S3_BUCKET", "from-env")
    assert KappaResource().settings().s3_bucket == "from-env"
    configured = KappaResource(s3_bucket="from-field", bootstrap_servers="field:9092")
    assert (configured.settings().s3_bucket, configured.settings().bootstrap_servers) == ("from-field", "field:9092")
    assert (plain.group_prefix, KappaResource(group_prefix="team-b").settings().group_prefix) == ("kappa", "team-b")
    for field, variable in (("events_topic", "KAPPA_EVENTS_TOPIC"), ("group_prefix", "KAPPA_GROUP_PREFIX")):
        with pytest.raises(ConfigError, match=variable):  # set empty: a mistake, not "use the default"
            KappaResource(**{field: ""}).settings()
    monkeypatch.setenv("DEPLOYMENT_BUCKET", "from-envvar")  # a deployment may name its own variable
    seen = {}

    @dg.asset
    def reads_settings(kappa: KappaResource) -> None:
        seen["bucket"] = kappa.settings().s3_bucket

    deployed = KappaResource(s3_bucket=dg.EnvVar("DEPLOYMENT_BUCKET"))
    assert dg.materialize([reads_settings], resources={"kappa": deployed}).success and seen["bucket"] == "from-envvar"
    monkeypatch.delenv("DEPLOYMENT_BUCKET")
    # the processor subprocess reads the same settings from the environment it is given
    assert load_settings(configured.environment()) == configured.settings()
    assert dict(os.environ) == {**before, "KAPPA_S3_BUCKET": "from-env"}
