"""Replay assets: load the archive into a replay topic, then run the processor over it.

``replay_load`` -> ``replay_consume`` -> ``corrected_report`` (reports.py). A run is one daily
partition, or a backfill's whole range (``BackfillPolicy.single_run``): then ONE replay topic and ONE
consumer group carry every day, and each day still gets its own manifest, report and checks
(docs/ARCHITECTURE.md, "Many days as one replay"). The consumer is the same program as the live worker
(``python -m workers.cli processor``) in bounded mode, launched through Dagster Pipes so its logs,
progress and result show up here; ``replay.consumers`` adds members to its group.
"""

import json
import shlex
from itertools import groupby
from typing import Any

import dagster as dg

from kappa_dagster.defs.assets.raw_archive import observation, raw_archive
from kappa_dagster.defs.partitions import OWNERS, daily_partitions
from kappa_dagster.defs.resources import KappaResource, ReplayOptions
from kappa_dagster.replay.step import ReplayStep, user_errors
from kappa_dagster.replay.target import ReplayTarget
from workers.replay import consume as replay_consumers
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest
from workers.reports import gate as report_gate

#: A backfill over many days launches ONE run for the whole range: one replay topic and group (the Kappa
#: way to reprocess a year); ``dagster/partition`` runs (CLI, sensors, schedule) stay one day each.
RANGE_POLICY = dg.BackfillPolicy.single_run()

#: What both replay steps are: daily partitions, a backfill in one run, in the replay group.
REPLAY_STEP: dict[str, Any] = {
    "partitions_def": daily_partitions,
    "backfill_policy": RANGE_POLICY,
    "owners": OWNERS,
    "group_name": "replay",
}


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
        **({"range_id": manifest.range_id, "range_days": len(manifest.range_days or [])} if manifest.range_id else {}),
    }


@dg.asset(**REPLAY_STEP, kinds={"kafka", "s3"}, deps=[raw_archive])
def replay_load(context: dg.AssetExecutionContext, kappa: KappaResource, replay: ReplayOptions) -> dg.MaterializeResult:
    """Publish the archive of the run's day(s) (deduplicated, event-time order, byte-exact) to ``<events>.replay.<id>``.

    Idempotent: an identical previous load (same archive fingerprint) is reused, a partial one redone.
    One run per (pipeline, version, day) at a time: the run holds every day's lease until its reports are
    checked; a new load gets its own topic and group (replay id ``<slot>-<run id>``, or the range's id).
    """
    step = ReplayStep.open(context, kappa, replay)
    target, run = step.targets[0], context.run_id[:8]
    with user_errors():
        spec = target.spec(step.settings, partitions=replay.partitions, throttle=replay.throttle, run=run)
        ranged = replay_loader.RangeSpec.of(spec, step.days) if step.is_range else None
    with step.lease(release=False) as lease, user_errors():
        options: dict[str, Any] = {
            "client": step.client,
            "force": replay.force,
            "progress": lambda p: context.log.info(f"replay {(ranged or spec).replay_id} {p.describe()}"),
            "lost": lease.lost,
        }
        if ranged is None:
            results = {target.day: replay_loader.load(step.settings, spec, **options)}
        else:
            results = replay_loader.load_range(step.settings, ranged, **options)
    for day, result in results.items():
        _log_load(context, day, result)
        if ranged is not None:
            context.add_asset_metadata(_load_metadata(result), partition_key=day)
    if ranged is None:
        return dg.MaterializeResult(metadata=_load_metadata(results[target.day]))
    loaded = sum(not r.skipped for r in results.values())
    return dg.MaterializeResult(
        metadata={"range_id": ranged.replay_id, "days": dg.MetadataValue.int(len(results)),
                  "days_loaded": dg.MetadataValue.int(loaded)}
    )


def _log_load(context: dg.AssetExecutionContext, day: str, result: replay_loader.LoadResult) -> None:
    """The log line and the raw archive observation of one day's load (its data version: the fingerprint)."""
    manifest = result.manifest
    context.log.info(f"replay {manifest.replay_id}: {'reused, ' + result.reason if result.skipped else 'loaded'}"
                     + (f" into {manifest.replay_topic}" if manifest.range_id else ""))
    context.log_event(
        observation(
            day,
            {"objects": manifest.source_files, "bytes": manifest.source_bytes, "rows": manifest.rows_read},
            manifest.archive_fingerprint,
            records=dg.MetadataValue.int(manifest.records) if manifest.records is not None else None,
            duplicate_rows=dg.MetadataValue.int(manifest.duplicates_dropped) if manifest.records is not None else None,
        )
    )


def _load_metadata(result: replay_loader.LoadResult) -> dict[str, Any]:
    manifest = result.manifest
    return {
        **manifest_metadata(manifest),
        "reused": result.skipped,
        "reason": result.reason,
        "load_seconds": dg.MetadataValue.float(float(manifest.load_seconds or 0.0)),
    }


def processor_command(target: ReplayTarget, manifest: ReplayManifest, extra: list[str]) -> list[str]:
    """The live worker's entry point, in bounded replay mode (``workers.replay.consume``)."""
    with user_errors():
        return replay_consumers.processor_command(target.pipeline, target.version, manifest, extra)


@dg.asset(**REPLAY_STEP, kinds={"kafka", "python"}, deps=[replay_load])
def replay_consume(
    context: dg.AssetExecutionContext,
    kappa: KappaResource,
    replay: ReplayOptions,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """Run the processor over the replay topic from offset 0 to the recorded end (new replay group), as
    ``replay.consumers`` members; a range's days share one topic, so one group consumes them all."""
    step = ReplayStep.open(context, kappa, replay)
    with user_errors():
        replay_consumers.valid_consumers(replay.consumers)
    metadata: dict[str, dict[str, Any]] = {}
    with step.lease(release=False):
        manifests = step.manifests()
        todo = {d: m for d, m in manifests.items() if replay.force or not _published(step, m)}
        for day in sorted(set(manifests) - set(todo)):
            context.log.info(f"report of replay {manifests[day].replay_id} is published and current: nothing to do")
            metadata[day] = {**manifest_metadata(manifests[day]), "reused": True}
        by_group = groupby(sorted(todo, key=lambda d: (todo[d].group or "", d)), key=lambda d: todo[d].group)
        for _group, days in by_group:  # a range's days share one group: one bounded run for all of them
            for day, (manifest, result) in _consume(context, step, pipes_subprocess_client, kappa,
                                                    {day: todo[day] for day in days}).items():
                metadata[day] = {
                    **manifest_metadata(manifest),
                    "reused": False,
                    "stats": dg.MetadataValue.json((result.get("stats") or {}).get(day, {})),
                    "processor_result": dg.MetadataValue.json(result),
                }
    if not step.is_range:
        return dg.MaterializeResult(metadata=metadata[step.target.day])
    for day, values in metadata.items():
        context.add_asset_metadata(values, partition_key=day)
    return dg.MaterializeResult(metadata={"days": dg.MetadataValue.int(len(manifests)),
                                          "days_consumed": dg.MetadataValue.int(len(todo)),
                                          "consumers": dg.MetadataValue.int(replay.consumers)})


def _published(step: ReplayStep, manifest: ReplayManifest) -> bool:
    return replay_manifest.published(step.client, step.bucket, manifest)


def _consume(
    context: dg.AssetExecutionContext,
    step: ReplayStep,
    pipes: dg.PipesSubprocessClient,
    kappa: KappaResource,
    manifests: dict[str, ReplayManifest],
) -> dict[str, tuple[ReplayManifest, dict[str, Any]]]:
    """One bounded run of the group these days share (member 1 through Pipes, the others beside it), then
    each day's report bound by ETag (``consumed``)."""
    first = next(iter(manifests.values()))
    target = next(t for t in step.targets if t.day == first.day)
    command = processor_command(target, first, shlex.split(step.replay.processor_args))
    extra = replay_consumers.start_members(command, step.replay.consumers - 1, kappa.environment())
    if extra:
        context.log.info(f"started {len(extra)} more member(s) of {first.group}")
    try:
        invocation = pipes.run(
            command=command,
            context=context,
            env=kappa.environment(),  # the child decides its settings exactly as this step did
            extras={"replay_id": first.range_id or first.replay_id, "end_offsets": first.end_offsets,
                    "day": first.day, "days": sorted(manifests)},
        )
        with user_errors():
            replay_consumers.wait_members(extra, timeout=600)
    except BaseException:
        replay_consumers.stop_members(extra)
        raise
    result = _last_custom_message(invocation)
    done = {}
    with user_errors(allow_retries=True):  # binds the report this run wrote; the sensor reports consumed replays
        for day, manifest in manifests.items():
            done[day] = (report_gate.mark_consumed(step.client, step.bucket, manifest, result), result)
    return done


def _last_custom_message(invocation: dg.PipesClientCompletedInvocation) -> dict[str, Any]:
    messages = invocation.get_custom_messages()
    last = messages[-1] if messages else {}
    return last if isinstance(last, dict) else {"message": json.dumps(last, default=str)}

