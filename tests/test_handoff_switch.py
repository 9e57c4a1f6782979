"""The switch recorded at promote, on real S3 (no stream): every partition, uncovered days shown,
old checkpoints cleared once, and a served report that refuses a report recomputed after the promote."""

from __future__ import annotations

import io
import json
from typing import Any

import dagster as dg
import polars as pl
import pytest
from dagster_env import dagster_home, fresh_resources  # noqa: F401  (fixture)
from replay_data import checked_manifest, day_records, write_day

from workers import keys, promote
from workers.archive import stats as archive_stats
from workers.config import Settings
from workers.errors import KappaError
from workers.processor import handoff
from workers.processor.engine import run_processor
from workers.replay import manifest as replay_manifest

DAYS = ["2026-11-20", "2026-11-21"]


def reported(s3: Any, settings: Settings, day: str, ends: dict[str, int], partitions: int = 3) -> None:
    """A day as the gate leaves it once its checks passed (status, checked snapshot, report ETag)."""
    bucket, topic = settings.s3_bucket, settings.events_topic
    report = pl.DataFrame(
        {"window_start": [0], "type": ["purchase"], "events": [2], "amount": [3.5]},
        schema={"window_start": pl.Datetime("ms", "UTC"), "type": pl.String, "events": pl.Int64, "amount": pl.Float64},
    )
    buffer = io.BytesIO()
    report.write_parquet(buffer)
    report_key = keys.report_file("orders", 2, day)
    etag = s3.put_object(Bucket=bucket, Key=report_key, Body=buffer.getvalue())["ETag"]
    manifest = checked_manifest(
        bucket,
        topic,
        2,
        day,
        partitions=partitions,
        partitioning="source",
        source_end_offsets=ends,
        report_key=report_key,
        report_etag=etag,
        checked_fingerprint=archive_stats.days_fingerprints(s3, bucket, topic).get(day),
    )
    replay_manifest.write_manifest(s3, bucket, manifest)


def test_switch_covers_every_partition_and_the_promote_job_shows_uncovered_days(
    settings: Settings,
    s3: Any,
    dagster_home: Any,  # noqa: F811
) -> None:
    from kappa_dagster import defs

    # promoted: day 1 read partition 0 up to 40 and partition 1 up to 30; day 2 partition 0 up to 90
    reported(s3, settings, DAYS[0], {"0": 40, "1": 30})
    reported(s3, settings, DAYS[1], {"0": 90})
    # not promoted: a day with a record at offset 12 of partition 0, below the start (uncovered)
    write_day(s3, settings.s3_bucket, settings.events_topic, "2026-11-19", day_records("2026-11-19", 3, 1, 0, 12))
    with dg.instance_for_test() as instance:
        config = {"ops": {"promote_version": {"config": {"pipeline": "orders", "version": 2}}}}
        result = defs.resolve_job_def("promote").execute_in_process(
            run_config=config, instance=instance, resources=fresh_resources()
        )
        assert result.success
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    pointer = promote.read_current(s3, settings.s3_bucket, "orders")
    assert pointer is not None
    # partition 2 holds no record of the promoted days: it is in the switch, from 0 (never "latest")
    assert pointer["live_start_offsets"] == {"0": 40, "1": 0, "2": 0}
    assert pointer["switch"]["covered"] == {DAYS[0]: {"0": 40, "1": 30}, DAYS[1]: {"0": 90}}
    assert pointer["uncovered_days"] == ["2026-11-19"]
    assert any("uncovered days" in line and "2026-11-19" in line for line in logs), logs
    switch = handoff.switch_of(pointer)
    frame = pl.DataFrame({"day": [DAYS[0], DAYS[0], DAYS[1], DAYS[1], "2026-11-22"], "offset": [39, 40, 89, 90, 5]})
    covered = frame.select(switch.covered_rows(0, pl.col("day"), pl.col("offset")))
    assert covered.to_series().to_list() == [True, False, True, False, False]


def test_explicit_start_offsets_clear_an_older_checkpoint_once(settings: Settings, s3: Any) -> None:
    prefix = keys.live_prefix("orders", 2)
    old = f"{prefix}_state/part=0.json"
    s3.put_object(Bucket=settings.s3_bucket, Key=old, Body=b"{}")
    assert handoff.claim_live_prefix(s3, settings.s3_bucket, prefix, "switch-a") is True
    assert s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=old).get("KeyCount") == 0
    s3.put_object(Bucket=settings.s3_bucket, Key=old, Body=b"{}")  # the new run's own checkpoint
    assert handoff.claim_live_prefix(s3, settings.s3_bucket, prefix, "switch-a") is False  # a restart keeps it
    assert s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=old).get("KeyCount") == 1
    assert handoff.claim_live_prefix(s3, settings.s3_bucket, prefix, "switch-b") is True  # a new switch does not


def test_served_report_refuses_a_report_recomputed_after_the_promote(settings: Settings, s3: Any) -> None:
    reported(s3, settings, DAYS[0], {"0": 4})
    promote.promote(s3, settings.s3_bucket, settings.events_topic, "orders", 2)
    version, served = handoff.served_report(s3, settings.s3_bucket, "orders", DAYS[0])
    assert version == 2 and served["events"].to_list() == [2] and served["amount"].to_list() == [3.5]
    body = json.dumps({"not": "a report"}).encode()
    s3.put_object(Bucket=settings.s3_bucket, Key=keys.report_file("orders", 2, DAYS[0]), Body=body)
    with pytest.raises(KappaError, match="promote orders v2 again"):
        handoff.served_report(s3, settings.s3_bucket, "orders", DAYS[0])
    with pytest.raises(KappaError, match="needs orders v1 promoted"):
        run_processor(settings, "orders", 1, handoff=True)
