"""Replay progress sensor: reads offsets only (never consumes), plots lag, requests the report run.

Joining the replay group would rebalance the real consumer, so progress is committed offsets vs the
manifest's end offsets. The gate is requested only for a ``consumed`` replay whose group is at the end.
"""

import json

import dagster as dg
from confluent_kafka import KafkaException

from kappa_dagster.defs.assets.replay import replay_consume
from kappa_dagster.defs.jobs import corrected_report_job
from kappa_dagster.defs.partitions import daily_partitions
from kappa_dagster.defs.resources import KappaResource
from kappa_dagster.replay.target import PIPELINE_TAG, VERSION_TAG
from workers.lag import GroupLag, LagReader
from workers.replay import manifest as replay_manifest
from workers.replay import status as replay_status
from workers.replay.manifest import ReplayManifest

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def day_in_flight(instance: dg.DagsterInstance, day: str) -> bool:
    """A run of this day is queued or running: its own partition, or a backfill range (one run) covering it."""
    if instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": day}, statuses=IN_FLIGHT), limit=1):
        return True
    ranges = instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT), limit=200)
    return any(run.tags.get(RANGE_START, "~") <= day <= run.tags.get(RANGE_END, "") for run in ranges)


def observe(manifest: ReplayManifest, state: GroupLag) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=replay_consume.key,
        partition=manifest.day,
        metadata={
            "replay_id": manifest.replay_id,
            "version": dg.MetadataValue.int(manifest.version),
            "lag": dg.MetadataValue.int(state.lag),
            "percent_done": dg.MetadataValue.float(state.percent_done),
            "records_done": dg.MetadataValue.int(state.consumed),
            "records": dg.MetadataValue.int(state.end_total),
            "committed_offsets": dg.MetadataValue.json(
                {str(p): min(state.committed.get(p) or 0, end) for p, end in sorted(state.end.items())}
            ),
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
def replay_progress_sensor(context: dg.SensorEvaluationContext, kappa: KappaResource) -> dg.SensorResult:
    settings = kappa.settings()
    reader = LagReader(settings)
    cursor: dict[str, int] = json.loads(context.cursor or "{}")
    known_days = set(daily_partitions.get_partition_keys())
    events: list[dg.AssetObservation] = []
    requests: list[dg.RunRequest] = []
    for manifest in replay_manifest.iter_manifests(kappa.s3_client(settings), settings.s3_bucket):
        if manifest.status not in {"loaded", "consumed"} or manifest.day not in known_days:
            continue
        if manifest.source_topic != settings.events_topic:
            continue
        try:
            state = replay_status.progress(reader, manifest)
        except KafkaException as exc:  # unreadable this tick: no observation rather than a wrong one
            context.log.warning(f"replay {manifest.replay_id}: progress not readable, next tick tries again: {exc}")
            continue
        if state is None:  # its topic is gone: nothing to observe, nothing to report
            continue
        if cursor.get(manifest.replay_id) != state.lag:
            events.append(observe(manifest, state))
            cursor[manifest.replay_id] = state.lag
        consumed = manifest.status == "consumed"
        if consumed and state.lag == 0 and not day_in_flight(context.instance, manifest.day):
            requests.append(request_report(manifest))
    return dg.SensorResult(run_requests=requests, asset_events=events, cursor=json.dumps(cursor, sort_keys=True))
