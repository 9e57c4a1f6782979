"""Replay progress sensor: reads offsets only (never consumes), plots lag, requests the report run.

Each tick, for every loaded replay (manifest status ``loaded`` or ``consumed``), it compares the
replay group's committed offsets with the end offsets the load recorded and emits an
``AssetObservation`` on ``replay_consume`` (lag, percent done) when they moved. It requests
``corrected_report_job`` (the gate) only for a replay whose consume step *succeeded* (status
``consumed``: the processor finished, saw every record and its report is bound to this load) and
whose group is at the end, with a ``run_key`` per consumed report, unless a run for the day is in
flight. A consumer that died or miscounted leaves the replay ``loaded``: nothing is requested.
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
from workers.replay.manifest import ReplayManifest

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def day_in_flight(instance: dg.DagsterInstance, day: str) -> bool:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": day}, statuses=IN_FLIGHT), limit=1)
    return bool(runs)


def observe(manifest: ReplayManifest, state: dict[str, Any]) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=replay_consume.key,
        partition=manifest.day,
        metadata={
            "replay_id": manifest.replay_id,
            "version": dg.MetadataValue.int(manifest.version),
            "lag": dg.MetadataValue.int(state["lag"]),
            "percent_done": dg.MetadataValue.float(state["percent_done"]),
            "records_done": dg.MetadataValue.int(state["done"]),
            "records": dg.MetadataValue.int(state["total"]),
            "committed_offsets": dg.MetadataValue.json(state["committed"]),
        },
    )


def request_report(manifest: ReplayManifest) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"report:{manifest.replay_id}:{str(manifest.report_etag).strip(chr(34))[:16]}",
        partition_key=manifest.day,
        tags={VERSION_TAG: str(manifest.version), PIPELINE_TAG: manifest.pipeline},
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
        if manifest.status not in {"loaded", "consumed"} or manifest.day not in known_days:
            continue
        if manifest.source_topic != settings.events_topic:
            continue
        state = offsets.progress(settings, manifest)
        if cursor.get(manifest.replay_id) != state["lag"]:
            events.append(observe(manifest, state))
            cursor[manifest.replay_id] = state["lag"]
        consumed = manifest.status == "consumed"
        if consumed and state["lag"] == 0 and not day_in_flight(context.instance, manifest.day):
            requests.append(request_report(manifest))
    return dg.SensorResult(run_requests=requests, asset_events=events, cursor=json.dumps(cursor, sort_keys=True))
