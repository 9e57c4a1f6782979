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

from kappa_dagster.defs.assets.raw_archive import observation, raw_archive
from kappa_dagster.defs.partitions import OWNERS, daily_partitions
from kappa_dagster.defs.resources import KappaResource, ReplayOptions
from kappa_dagster.replay.step import ReplayStep, user_errors
from kappa_dagster.replay.target import ReplayTarget
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest
from workers.reports import gate as report_gate

#: What both replay steps are: one daily partition each, in the replay group.
REPLAY_STEP: dict[str, Any] = {"partitions_def": daily_partitions, "owners": OWNERS, "group_name": "replay"}


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


@dg.asset(**REPLAY_STEP, kinds={"kafka", "s3"}, deps=[raw_archive])
def replay_load(context: dg.AssetExecutionContext, kappa: KappaResource, replay: ReplayOptions) -> dg.MaterializeResult:
    """Publish the day's archive (deduplicated, event-time order, byte-exact) to ``<events>.replay.<id>``.

    Idempotent: an identical previous load (same archive fingerprint) is reused, a partial one redone.
    One run per (pipeline, version, day) at a time: the run holds the day's lease until its report is
    checked; a new load gets its own topic and group (replay id ``<slot>-<run id>``).
    """
    step = ReplayStep.open(context, kappa, replay)
    target, run = step.target, context.run_id[:8]
    with user_errors():
        spec = target.spec(step.settings, partitions=replay.partitions, throttle=replay.throttle, run=run)
    with step.lease(release=False) as lease, user_errors():
        result = replay_loader.load(
            step.settings,
            spec,
            client=step.client,
            force=replay.force,
            progress=lambda p: context.log.info(f"replay {spec.replay_id} {p.describe()}"),
            lost=lease.lost,
        )
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
        *(("--late-topic", manifest.late_topic) if manifest.late_topic else ()),
        "--from-beginning",
        "--until-end",
        "--progress",
        "log",
        *grace,
        *extra,
    ]


@dg.asset(**REPLAY_STEP, kinds={"kafka", "python"}, deps=[replay_load])
def replay_consume(
    context: dg.AssetExecutionContext,
    kappa: KappaResource,
    replay: ReplayOptions,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """Run the processor over the replay topic from offset 0 to the recorded end (new replay group)."""
    step = ReplayStep.open(context, kappa, replay)
    target = step.target
    with step.lease(release=False):
        manifest = step.manifest()
        if replay_manifest.published(step.client, step.bucket, manifest) and not replay.force:
            context.log.info(f"report of replay {manifest.replay_id} is published and current: nothing to consume")
            return dg.MaterializeResult(metadata={**manifest_metadata(manifest), "reused": True})
        invocation = pipes_subprocess_client.run(
            command=processor_command(target, manifest, shlex.split(replay.processor_args)),
            context=context,
            env=kappa.environment(),  # the child decides its settings exactly as this step did
            extras={"replay_id": manifest.replay_id, "end_offsets": manifest.end_offsets, "day": target.day},
        )
        result = _last_custom_message(invocation)
        with user_errors(allow_retries=True):  # binds the report this run wrote; the sensor reports consumed replays
            manifest = report_gate.mark_consumed(step.client, step.bucket, manifest, result)
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

