"""Replay progress sensor: reads offsets only (never consumes), plots lag, requests the report run.

Joining the replay group would rebalance the real consumer, so progress is committed offsets vs the
manifest's end offsets. The gate is requested only for a ``consumed`` replay whose group is at the end.
"""

import json
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from kappa_dagster import offsets
from kappa_dagster.defs.assets.replay import replay_consume
from kappa_dagster.defs.jobs import corrected_report_job
from kappa_dagster.defs.partitions import daily_partitions
from kappa_dagster.defs.resources import KafkaResource
from kappa_dagster.replay_target import PIPELINE_TAG, VERSION_TAG
from workers.replay import manifest as replay_manifest

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def day_in_flight(instance: dg.DagsterInstance, day: str) -> bool:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": day}, statuses=IN_FLIGHT), limit=1)
    return bool(runs)


def observe(manifest: dict[str, Any], state: dict[str, Any]) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=replay_consume.key,
        partition=manifest["day"],
        metadata={
            "replay_id": manifest["replay_id"],
            "version": dg.MetadataValue.int(manifest["version"]),
            "lag": dg.MetadataValue.int(state["lag"]),
            "percent_done": dg.MetadataValue.float(state["percent_done"]),
            "records_done": dg.MetadataValue.int(state["done"]),
            "records": dg.MetadataValue.int(state["total"]),
            "committed_offsets": dg.MetadataValue.json(state["committed"]),
        },
    )


def request_report(manifest: dict[str, Any]) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"report:{manifest['replay_id']}:{str(manifest.get('report_etag')).strip(chr(34))[:16]}",
        partition_key=manifest["day"],
        tags={VERSION_TAG: str(manifest["version"]), PIPELINE_TAG: manifest["pipeline"]},
    )


@dg.sensor(
    job=corrected_report_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Replay lag per day from committed offsets; requests the corrected report once a replay is consumed.",
)
def replay_progress_sensor(
    context: dg.SensorEvaluationContext, s3: S3Resource, kafka: KafkaResource
) -> dg.SensorResult:
    settings = kafka.settings()
    cursor: dict[str, int] = json.loads(context.cursor or "{}")
    known_days = set(daily_partitions.get_partition_keys())
    events: list[dg.AssetObservation] = []
    requests: list[dg.RunRequest] = []
    for manifest in replay_manifest.iter_manifests(s3.get_client(), settings.s3_bucket):
        if manifest.get("status") not in {"loaded", "consumed"} or manifest.get("day") not in known_days:
            continue
        if manifest.get("source_topic") != settings.events_topic:
            continue
        state = offsets.progress(settings, manifest)
        if cursor.get(manifest["replay_id"]) != state["lag"]:
            events.append(observe(manifest, state))
            cursor[manifest["replay_id"]] = state["lag"]
        consumed = manifest["status"] == "consumed"
        if consumed and state["lag"] == 0 and not day_in_flight(context.instance, manifest["day"]):
            requests.append(request_report(manifest))
    return dg.SensorResult(run_requests=requests, asset_events=events, cursor=json.dumps(cursor, sort_keys=True))
