"""Raw archive sensor: observes each day's prefix (objects, bytes, rows) when it changes, so the UI
shows which days hold data. Lists keys and reads Parquet footers only."""

import hashlib
import json

import dagster as dg
from dagster_aws.s3 import S3Resource

from kappa_dagster.defs.assets.raw_archive import observation
from kappa_dagster.defs.partitions import daily_partitions
from kappa_dagster.defs.resources import KafkaResource
from workers import archive_stats


def _digest(files: list[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:16]


@dg.sensor(
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Observes raw/<topic>/dt=<day>/ prefixes (objects, bytes, rows) when they change.",
)
def raw_archive_sensor(context: dg.SensorEvaluationContext, s3: S3Resource, kafka: KafkaResource) -> dg.SensorResult:
    settings = kafka.settings()
    client = s3.get_client()
    cursor: dict[str, str] = json.loads(context.cursor or "{}")
    known_days = set(daily_partitions.get_partition_keys())
    events = []
    for day, files in sorted(archive_stats.days_listing(client, settings.s3_bucket, settings.events_topic).items()):
        digest = _digest(files)
        if day not in known_days or cursor.get(day) == digest:
            continue
        rows = sum(archive_stats.parquet_rows(client, settings.s3_bucket, key, size) for key, size in files)
        events.append(observation(day, {"objects": len(files), "bytes": sum(s for _, s in files), "rows": rows}))
        cursor[day] = digest
    return dg.SensorResult(asset_events=events, cursor=json.dumps(cursor, sort_keys=True))
