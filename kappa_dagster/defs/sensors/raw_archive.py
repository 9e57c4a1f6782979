"""Raw archive sensor: observes each day's prefix and re-runs days whose corrected report went stale.

Late records change a day after it was reported; re-running is rate-limited (stable fingerprint over
two ticks, one run per fingerprint, a cap per tick) so a trickle of late data never floods the queue.
The rules are in docs/ARCHITECTURE.md, "Stale days re-run themselves".
"""

import json
import os
from collections import defaultdict
from typing import Any

import dagster as dg

from kappa_dagster.defs.assets.raw_archive import observation
from kappa_dagster.defs.jobs import reprocess
from kappa_dagster.defs.partitions import daily_partitions
from kappa_dagster.defs.resources import KappaResource
from kappa_dagster.defs.sensors.replay_progress import day_in_flight
from kappa_dagster.replay.target import PIPELINE_TAG, VERSION_TAG
from workers import promote
from workers.archive import stats as archive_stats
from workers.replay import manifest as replay_manifest

STALE_TAG = "kappa/stale"


def interval_seconds() -> int:
    return max(1, int(os.environ.get("KAPPA_ARCHIVE_SENSOR_SECONDS", "120")))


def runs_per_tick() -> int:
    return max(1, int(os.environ.get("KAPPA_STALE_RUNS_PER_TICK", "2")))


def reported_versions(client: Any, bucket: str, topic: str) -> dict[tuple[str, str], dict[int, str]]:
    """(pipeline, day) -> {version: archive fingerprint its newest reported replay was computed from}."""
    found: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    manifests = sorted(replay_manifest.iter_manifests(client, bucket), key=lambda m: m.started_at or "")
    for manifest in manifests:  # oldest first: a newer replay of the same day and version wins
        reported = manifest.status == "reported" and manifest.source_topic == topic
        if reported and manifest.archive_fingerprint:
            versions = found[(manifest.pipeline, manifest.day)]
            versions[manifest.version] = manifest.archive_fingerprint
    return found


def stale_version(versions: dict[int, str], fingerprint: str, promoted: int | None) -> int | None:
    """The version to re-run for a day whose archive is now ``fingerprint`` (None: nothing is stale)."""
    stale = [v for v, computed_from in versions.items() if computed_from != fingerprint]
    if not stale:
        return None
    return promoted if promoted in stale else max(stale)


def stale_requests(
    context: dg.SensorEvaluationContext,
    client: Any,
    bucket: str,
    topic: str,
    fingerprints: dict[str, str],
    settled: dict[str, str],
) -> list[dg.RunRequest]:
    requests: list[dg.RunRequest] = []
    for (pipeline, day), versions in sorted(reported_versions(client, bucket, topic).items()):
        fingerprint = fingerprints.get(day)
        if fingerprint is None or settled.get(day) != fingerprint or len(requests) >= runs_per_tick():
            continue
        version = stale_version(versions, fingerprint, promote.current_version(client, bucket, pipeline))
        if version is None or day_in_flight(context.instance, day):
            continue
        context.log.info(f"{pipeline} v{version} {day}: archive {fingerprint} changed since its report, re-running")
        requests.append(
            dg.RunRequest(
                run_key=f"stale:{pipeline}:{day}:{fingerprint}",
                partition_key=day,
                tags={VERSION_TAG: str(version), PIPELINE_TAG: pipeline, STALE_TAG: fingerprint},
            )
        )
    return requests


@dg.sensor(
    job=reprocess,
    minimum_interval_seconds=interval_seconds(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Observes raw/<topic>/dt=<day>/ (objects, bytes, rows; data version = fingerprint) and re-runs "
    "days whose archive changed after their corrected report (rate-limited, one run per fingerprint).",
)
def raw_archive_sensor(context: dg.SensorEvaluationContext, kappa: KappaResource) -> dg.SensorResult:
    settings = kappa.settings()
    client = kappa.s3_client(settings)
    bucket, topic = settings.s3_bucket, settings.events_topic
    previous: dict[str, str] = json.loads(context.cursor or "{}")
    known_days = set(daily_partitions.get_partition_keys())
    listing = archive_stats.days_listing(client, bucket, topic)
    fingerprints = {
        d: fp for d, fp in archive_stats.days_fingerprints(client, bucket, topic).items() if d in known_days
    }
    events = []
    for day, fingerprint in sorted(fingerprints.items()):
        if previous.get(day) == fingerprint or day not in listing:
            continue
        files = listing[day]
        rows = sum(archive_stats.parquet_rows(client, bucket, key, size) for key, size in files)
        summary = {"objects": len(files), "bytes": sum(s for _, s in files), "rows": rows}
        events.append(observation(day, summary, fingerprint))
    requests = stale_requests(context, client, bucket, topic, fingerprints, previous)
    return dg.SensorResult(run_requests=requests, asset_events=events, cursor=json.dumps(fingerprints, sort_keys=True))
