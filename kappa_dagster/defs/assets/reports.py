"""The corrected report per day and version: the gate between a replay's output and what users read.

The replay's report is published only after the blocking checks against the SQL reference pass
(``workers.reports.gate``); a reviewer gets rows, totals, a preview and the diff against live here.
"""

import io
from collections.abc import Iterator
from typing import Any

import dagster as dg
import polars as pl

from kappa_dagster.defs.assets.raw_archive import raw_archive
from kappa_dagster.defs.assets.replay import RANGE_POLICY, replay_consume
from kappa_dagster.defs.partitions import OWNERS, daily_partitions
from kappa_dagster.defs.resources import KappaResource, ReplayOptions
from kappa_dagster.replay.step import ReplayStep, check_outputs, user_errors
from kappa_dagster.replay.target import ReplayTarget
from workers import promote
from workers.config import Settings
from workers.pipelines import get_pipeline
from workers.processor import results
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest
from workers.reports import diff as report_diff
from workers.reports import gate as report_gate


def read_report(client: Any, bucket: str, target: ReplayTarget) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The report and its stats, or a Failure saying how to produce them."""
    report = results.corrected_report(client, bucket, target.pipeline, target.version, target.day)
    if report is None:
        raise dg.Failure(
            description=f"no report at s3://{bucket}/{target.report_key} (or its stats.json): "
            f"run the reprocess job for {target.day} first",
            allow_retries=False,
        )
    return report.frame, report.stats


def live_results(settings: Settings, client: Any, target: ReplayTarget, live_version: int | None) -> Any:
    """Live results of the version users currently read (CURRENT pointer, else v1), if a reader exists."""
    version = live_version or promote.current_version(client, settings.s3_bucket, target.pipeline) or 1
    try:
        return version, results.live_results(client, settings.s3_bucket, target.pipeline, version, target.day)
    except Exception as exc:  # no live results for that day is normal; say so instead of failing
        return version, f"{type(exc).__name__}: {exc}"


def report_metadata(report: pl.DataFrame, stats: dict[str, Any]) -> dict[str, Any]:
    totals = report.group_by("type").agg(pl.col("events").sum(), pl.col("amount").sum()).sort("type")
    return {
        "dagster/row_count": dg.MetadataValue.int(report.height),
        "events": dg.MetadataValue.int(int(report["events"].sum())),
        "amount": dg.MetadataValue.float(float(report["amount"].sum())),
        "windows": dg.MetadataValue.int(report["window_start"].n_unique()),
        "stats": dg.MetadataValue.json(stats),
        # one number per key so the asset's Plots tab charts them across materializations
        **{f"{name}_records": dg.MetadataValue.int(int(stats.get(name, 0))) for name in ("dlq", "duplicates", "late")},
        **{f"events_{row['type']}": dg.MetadataValue.int(int(row["events"])) for row in totals.iter_rows(named=True)},
        "totals_by_type": dg.MetadataValue.md(report_diff.markdown(totals)),
        "preview": dg.MetadataValue.md(report_diff.markdown(report)),
    }


def diff_metadata(live_version: int | None, live: Any, report: pl.DataFrame) -> dict[str, Any]:
    if live is None:
        return {"live_diff": "no live results reader available"}
    if not isinstance(live, pl.DataFrame):
        return {"live_version": dg.MetadataValue.int(live_version or 0), "live_diff": f"unavailable ({live})"}
    summary = report_diff.summary(report, live)
    return {
        "live_version": dg.MetadataValue.int(live_version or 0),
        "live_windows_changed": dg.MetadataValue.int(summary["windows_changed"]),
        "live_events_delta": dg.MetadataValue.int(summary["events_delta"]),
        "live_amount_delta": dg.MetadataValue.float(summary["amount_delta"]),
        "live_diff": dg.MetadataValue.md(report_diff.markdown(summary["changed"], limit=20)),
    }


def check_result(check: report_gate.Check) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=check.name,
        passed=check.passed,
        description=check.description,
        metadata={name: _metadata_value(value) for name, value in check.metadata.items()},
    )


def _metadata_value(value: Any) -> Any:
    if isinstance(value, bool | int | str | None):
        return dg.MetadataValue.text(str(value)) if value is None else value
    return dg.MetadataValue.json(value)


GATE_CHECKS = [
    dg.AssetCheckSpec(
        report_gate.REFERENCE_CHECK,
        asset="corrected_report",
        blocking=True,
        description="Equal to the pipeline's SQL definition (DuckDB) over the exact archive snapshot loaded.",
    ),
    dg.AssetCheckSpec(
        report_gate.ACCOUNTED_CHECK,
        asset="corrected_report",
        blocking=True,
        description="counted + dlq + duplicates + late == the snapshot's distinct records; events sum to counted.",
    ),
]


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=RANGE_POLICY,
    owners=OWNERS,
    group_name="reports",
    kinds={"s3", "parquet", "duckdb"},
    # raw_archive too: the report records the day's data version it was computed from, so the UI
    # shows the day as stale once late records change its archive
    deps=[replay_consume, raw_archive],
    check_specs=GATE_CHECKS,
)
def corrected_report(
    context: dg.AssetExecutionContext, kappa: KappaResource, replay: ReplayOptions
) -> Iterator[Any]:
    """``reports/<P>/v<V>/dt=<D>/report.parquet``: the day recomputed by pipeline version V, published
    (manifest ``reported``) only when its blocking checks pass. A range run checks every day apart: one
    materialization and one verdict per check and day."""
    step = ReplayStep.open(context, kappa, replay)
    with step.lease(release=True):
        manifests = step.manifests({"consumed", "reported", "rejected"})
        gated = {target.day: _gate(context, step, target, manifests[target.day]) for target in step.targets}
        _clean_up(context, step, [manifest for manifest, _verdict, _report in gated.values()])
    days: dict[str, dict[str, Any]] = {}
    for target in step.targets:
        manifest, verdict, report = gated[target.day]
        live_version, live = live_results(step.settings, step.client, target, replay.live_version)
        days[target.day] = {
            "path": f"s3://{step.bucket}/{target.report_key}",
            "pipeline": target.pipeline,
            "version": dg.MetadataValue.int(target.version),
            "replay_id": manifest.replay_id,
            "status": manifest.status,
            "source_fingerprint": manifest.source_fingerprint,
            # provenance: raw_archive's data version (keys, sizes, ETags) this report was computed from
            "archive_fingerprint": manifest.archive_fingerprint or "unknown (loaded before fingerprints)",
            **report_metadata(report, verdict.stats.as_dict()),
            **diff_metadata(live_version, live, report),
        }
    if not step.is_range:
        (day,) = days
        yield dg.MaterializeResult(metadata=days[day], check_results=[check_result(c) for c in gated[day][1].checks])
        return
    for day, metadata in days.items():
        context.add_asset_metadata(metadata, partition_key=day)
    statuses = [manifest.status for manifest, _verdict, _report in gated.values()]
    yield dg.MaterializeResult(metadata={
        "days": dg.MetadataValue.int(len(days)),
        "days_reported": dg.MetadataValue.int(statuses.count("reported")),
        "days_rejected": dg.MetadataValue.int(statuses.count("rejected")),
    })
    for day, (_manifest, verdict, _report) in gated.items():
        for check in verdict.checks:
            yield day_check(context.asset_key, day, check)
    yield from check_outputs(context)


def day_check(asset_key: dg.AssetKey, day: str, check: report_gate.Check) -> dg.AssetCheckEvaluation:
    """One day's verdict of a blocking check in a range run (an ``AssetCheckResult`` names no day there)."""
    result = check_result(check)
    return dg.AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=check.name,
        passed=check.passed,
        metadata=result.metadata,
        description=check.description,
        blocking=True,
        partition=day,
    )


def _gate(
    context: dg.AssetExecutionContext, step: ReplayStep, target: ReplayTarget, manifest: ReplayManifest
) -> tuple[ReplayManifest, report_gate.Verdict, pl.DataFrame]:
    """Check one day's consumed report against the reference and publish or reject it (one fenced write)."""
    with user_errors():
        verdict = report_gate.evaluate(step.client, step.bucket, manifest)
    report = pl.read_parquet(io.BytesIO(verdict.report))
    expected = get_pipeline(target.pipeline, target.version).output_schema
    if report.schema != expected:
        raise dg.Failure(description=f"report schema {dict(report.schema)} is not {dict(expected)}")
    manifest.report_rows = report.height
    manifest = report_gate.publish(step.client, step.bucket, manifest, verdict)
    outcome = ", ".join(verdict.failed) or "all checks passed"
    context.log.info(f"replay {manifest.replay_id}: {manifest.status} ({outcome})")
    return manifest, verdict, report


def _clean_up(context: dg.AssetExecutionContext, step: ReplayStep, manifests: list[ReplayManifest]) -> None:
    """Delete each replay's own topic, DLQ, group and checkpoints once its reports are published: a range's
    shared topic once every day of this run that reads it passed and no other day still has to read it."""
    if not step.replay.cleanup:
        return
    by_topic: dict[str | None, list[ReplayManifest]] = {}
    for manifest in manifests:
        by_topic.setdefault(manifest.replay_topic, []).append(manifest)
    for group in by_topic.values():
        first = group[0]
        if first.cleaned or any(m.status != "reported" for m in group):
            continue
        waiting = replay_loader.days_needing_topic(step.client, step.bucket, first)
        if waiting:
            context.log.info(f"kept {first.replay_topic}: days {', '.join(waiting)} still read it")
            continue
        replay_loader.cleanup(step.settings, first, step.client)
        for manifest in group:
            manifest.cleaned = True
            replay_manifest.write_manifest(step.client, step.bucket, manifest)
        context.log.info(
            f"deleted replay topic {first.replay_topic} (+ DLQ, group {first.group}, checkpoints)"
        )
