"""The corrected report per day and version: the gate between a replay's output and what users read.

The replay's report is published only after the blocking checks against the SQL reference pass
(``workers.reports.gate``); a reviewer gets rows, totals, a preview and the diff against live here.
"""

import io
from typing import Any

import dagster as dg
import polars as pl

from kappa_dagster.defs.assets.raw_archive import raw_archive
from kappa_dagster.defs.assets.replay import replay_consume
from kappa_dagster.defs.partitions import OWNERS, daily_partitions
from kappa_dagster.defs.resources import KappaResource, ReplayOptions
from kappa_dagster.replay.step import ReplayStep, user_errors
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
) -> dg.MaterializeResult:
    """``reports/<P>/v<V>/dt=<D>/report.parquet``: the day recomputed by pipeline version V, published
    (manifest ``reported``) only when its blocking checks pass."""
    step = ReplayStep.open(context, kappa, replay)
    target, settings, client = step.target, step.settings, step.client
    with step.lease(release=True):
        manifest = step.manifest({"consumed", "reported", "rejected"})
        with user_errors():
            verdict = report_gate.evaluate(client, settings.s3_bucket, manifest)
        report = pl.read_parquet(io.BytesIO(verdict.report))
        expected = get_pipeline(target.pipeline, target.version).output_schema
        if report.schema != expected:
            raise dg.Failure(description=f"report schema {dict(report.schema)} is not {dict(expected)}")
        manifest.report_rows = report.height
        manifest = report_gate.publish(client, settings.s3_bucket, manifest, verdict)
        outcome = ", ".join(verdict.failed) or "all checks passed"
        context.log.info(f"replay {manifest.replay_id}: {manifest.status} ({outcome})")
        if verdict.passed:
            _clean_up(context, settings, client, manifest, replay)
    live_version, live = live_results(settings, client, target, replay.live_version)
    return dg.MaterializeResult(
        metadata={
            "path": f"s3://{settings.s3_bucket}/{target.report_key}",
            "pipeline": target.pipeline,
            "version": dg.MetadataValue.int(target.version),
            "replay_id": manifest.replay_id,
            "status": manifest.status,
            "source_fingerprint": manifest.source_fingerprint,
            # provenance: raw_archive's data version (keys, sizes, ETags) this report was computed from
            "archive_fingerprint": manifest.archive_fingerprint or "unknown (loaded before fingerprints)",
            **report_metadata(report, verdict.stats.as_dict()),
            **diff_metadata(live_version, live, report),
        },
        check_results=[check_result(check) for check in verdict.checks],
    )


def _clean_up(
    context: dg.AssetExecutionContext, settings: Settings, client: Any, manifest: ReplayManifest, replay: Any
) -> None:
    """Delete this replay's own topic, DLQ, group and checkpoints once its report is published."""
    if replay.cleanup and not manifest.cleaned:
        replay_loader.cleanup(settings, manifest, client)
        manifest.cleaned = True
        replay_manifest.write_manifest(client, settings.s3_bucket, manifest)
        context.log.info(
            f"deleted replay topic {manifest.replay_topic} (+ DLQ, group {manifest.group}, checkpoints)"
        )
