"""Replay assets: load a day of the archive into its replay topic, then run the processor over it.

``replay_load`` -> ``replay_consume`` -> ``corrected_report`` (reports.py), one daily partition per
run. The consumer is the same program as the live worker (``python -m workers.cli processor``) in
bounded mode, launched through Dagster Pipes so its logs, progress and result show up here.
"""

import json
import shlex
import sys
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from kappa_dagster.defs.assets.raw_archive import observation, raw_archive
from kappa_dagster.defs.partitions import OWNERS, daily_partitions
from kappa_dagster.defs.resources import KafkaResource, ReplayOptions
from kappa_dagster.replay_target import ReplayTarget, target_of
from kappa_dagster.slot_lease import held
from workers.errors import KappaError
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest
from workers.reports import gate as report_gate


def _fail(exc: KappaError) -> dg.Failure:
    return dg.Failure(description=str(exc), allow_retries=False)


def manifest_metadata(manifest: ReplayManifest) -> dict[str, Any]:
    """What the UI shows for a replay: where it lives and how big it is (never credentials)."""
    return {
        "replay_id": manifest.replay_id,
        "topic": manifest.replay_topic,
        "group": manifest.group,
        "pipeline": manifest.pipeline,
        "version": dg.MetadataValue.int(manifest.version),
        "records": dg.MetadataValue.int(manifest.records or 0),
        "duplicates_dropped": dg.MetadataValue.int(manifest.duplicates_dropped or 0),
        "end_offsets": dg.MetadataValue.json(manifest.end_offsets or {}),
        "source_end_offsets": dg.MetadataValue.json(manifest.source_end_offsets or {}),
        "manifest": manifest.key,
    }


@dg.asset(
    partitions_def=daily_partitions,
    owners=OWNERS,
    group_name="replay",
    kinds={"kafka", "s3"},
    deps=[raw_archive],
)
def replay_load(
    context: dg.AssetExecutionContext, s3: S3Resource, kafka: KafkaResource, replay: ReplayOptions
) -> dg.MaterializeResult:
    """Publish the day's archive (deduplicated, event-time order, byte-exact) to ``<events>.replay.<id>``.

    Idempotent: an identical previous load (same archive fingerprint) is reused, a partial one redone.
    One run per (pipeline, version, day) at a time: the run holds the day's lease until its report is
    checked; a new load gets its own topic and group (replay id ``<slot>-<run id>``).
    """
    target = target_of(context, replay)
    settings = kafka.settings()
    client = s3.get_client()
    try:
        spec = target.spec(settings, partitions=replay.partitions, throttle=replay.throttle, run=context.run_id[:8])
    except KappaError as exc:
        raise _fail(exc) from None
    with held(context, client, settings.s3_bucket, spec.slot, target.label, replay, release=False) as lease:
        try:
            result = replay_loader.load(
                settings,
                spec,
                client=client,
                force=replay.force,
                progress=lambda p: context.log.info(f"replay {spec.replay_id} {p.describe()}"),
                lost=lease.lost,
            )
        except KappaError as exc:
            raise _fail(exc) from None
    manifest = result.manifest
    context.log.info(f"replay {manifest.replay_id}: {'reused, ' + result.reason if result.skipped else 'loaded'}")
    context.log_event(
        observation(
            target.day,
            {"objects": manifest.source_files, "bytes": manifest.source_bytes, "rows": manifest.rows_read},
            manifest.archive_fingerprint,
            records=dg.MetadataValue.int(manifest.records) if manifest.records is not None else None,
            duplicate_rows=dg.MetadataValue.int(manifest.duplicates_dropped) if manifest.records is not None else None,
        )
    )
    return dg.MaterializeResult(
        metadata={
            **manifest_metadata(manifest),
            "reused": result.skipped,
            "reason": result.reason,
            "load_seconds": dg.MetadataValue.float(float(manifest.load_seconds or 0.0)),
        }
    )


def processor_command(target: ReplayTarget, manifest: ReplayManifest, extra: list[str]) -> list[str]:
    """The live worker's entry point, in bounded replay mode.

    Over a replay topic written in event-time order the grace is finite (``processor_grace_ms``):
    bounded state, same report. ``extra`` (``replay.processor_args``) comes last, so it can override.
    """
    grace_ms = replay_manifest.processor_grace_ms(manifest)
    grace = [] if grace_ms is None else ["--grace-seconds", f"{grace_ms / 1000:g}"]
    return [
        sys.executable,
        "-m",
        "workers.cli",
        "processor",
        "--pipeline",
        target.pipeline,
        "--version",
        str(target.version),
        "--topic",
        manifest.replay_topic,
        "--group",
        manifest.group,
        "--dlq-topic",
        manifest.dlq_topic,
        "--from-beginning",
        "--until-end",
        "--progress",
        "log",
        *grace,
        *extra,
    ]


def loaded_manifest(
    client: Any, bucket: str, target: ReplayTarget, settings_topic: str, states: set[str] | None = None
) -> ReplayManifest:
    """The day's manifest, if its replay got at least as far as ``states`` (default: loaded)."""
    slot = replay_manifest.replay_id(target.pipeline, target.version, target.day, bucket, settings_topic)
    manifest = replay_manifest.read_manifest(client, bucket, slot)
    wanted = states or replay_manifest.LOADED_STATES
    if manifest is None or manifest.status not in wanted:
        status = manifest.status if manifest else "absent"
        raise dg.Failure(
            description=f"replay {slot} is {status}, not {' or '.join(sorted(wanted))}: "
            f"run the reprocess job for {target.day}",
            allow_retries=False,
        )
    return manifest


@dg.asset(
    partitions_def=daily_partitions,
    owners=OWNERS,
    group_name="replay",
    kinds={"kafka", "python"},
    deps=[replay_load],
)
def replay_consume(
    context: dg.AssetExecutionContext,
    s3: S3Resource,
    kafka: KafkaResource,
    replay: ReplayOptions,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """Run the processor over the replay topic from offset 0 to the recorded end (new replay group)."""
    target = target_of(context, replay)
    settings = kafka.settings()
    client = s3.get_client()
    with held(context, client, settings.s3_bucket, target.slot(settings), target.label, replay, release=False):
        manifest = loaded_manifest(client, settings.s3_bucket, target, settings.events_topic)
        if replay_manifest.published(client, settings.s3_bucket, manifest) and not replay.force:
            context.log.info(f"report of replay {manifest.replay_id} is published and current: nothing to consume")
            return dg.MaterializeResult(metadata={**manifest_metadata(manifest), "reused": True})
        invocation = pipes_subprocess_client.run(
            command=processor_command(target, manifest, shlex.split(replay.processor_args)),
            context=context,
            extras={"replay_id": manifest.replay_id, "end_offsets": manifest.end_offsets, "day": target.day},
        )
        result = _last_custom_message(invocation)
        try:  # binds the report this processor run wrote; the sensor only ever reports consumed replays
            manifest = report_gate.mark_consumed(client, settings.s3_bucket, manifest, result)
        except KappaError as exc:
            raise dg.Failure(description=str(exc)) from None
    return dg.MaterializeResult(
        metadata={
            **manifest_metadata(manifest),
            "reused": False,
            "stats": dg.MetadataValue.json((result.get("stats") or {}).get(target.day, {})),
            "processor_result": dg.MetadataValue.json(result),
        }
    )


def _last_custom_message(invocation: dg.PipesClientCompletedInvocation) -> dict[str, Any]:
    messages = invocation.get_custom_messages()
    last = messages[-1] if messages else {}
    return last if isinstance(last, dict) else {"message": json.dumps(last, default=str)}

