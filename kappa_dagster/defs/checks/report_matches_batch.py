"""Check (not gating): the streaming result equals the pipeline's own batch computation over the archive.

Both sides run the pipeline's polars code (parse, windows, dedup), so this catches *engine* bugs
(state, checkpoints, watermarks, Kafka) but never a wrong pipeline rule: that is what the blocking
``report_matches_reference`` (the pipeline's SQL on DuckDB, in ``corrected_report``) is for.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from kappa_dagster.defs.assets.reports import corrected_report, read_report
from kappa_dagster.defs.partitions import daily_partitions
from kappa_dagster.defs.resources import KappaResource, ReplayOptions
from kappa_dagster.replay.archive_reads import archive_day, mismatches
from kappa_dagster.replay.step import ReplayStep
from kappa_dagster.replay.target import ReplayTarget
from workers.pipelines import get_pipeline
from workers.reports import diff as report_diff


@dg.asset_check(asset=corrected_report, partitions_def=daily_partitions, blocking=False)
def report_matches_batch(
    context: dg.AssetCheckExecutionContext, kappa: KappaResource, replay: ReplayOptions
) -> Iterator[Any]:
    """Streaming (Kafka replay) and the engine's batch mode (polars over S3) agree row for row, per day."""
    step = ReplayStep.open(context, kappa, replay)
    if not step.is_range:
        yield dg.AssetCheckResult(**_compare(step, step.target))
        return
    for target in step.targets:  # a range run: one verdict per day (an AssetCheckResult names no day there)
        yield dg.AssetCheckEvaluation(
            asset_key=corrected_report.key, check_name="report_matches_batch", partition=target.day,
            **_compare(step, target),
        )
    for output in context.op_execution_context.op_def.output_defs:
        yield dg.Output(None, output_name=output.name)


def _compare(step: ReplayStep, target: ReplayTarget) -> dict[str, Any]:
    report, _stats = read_report(step.client, step.bucket, target)
    pipeline = get_pipeline(target.pipeline, target.version)
    expected, _batch_stats = pipeline.batch_report(archive_day(step.client, step.settings, target))
    wrong = mismatches(report, expected, pipeline.key_columns)
    return {
        "passed": wrong.is_empty(),
        "metadata": {
            "report_rows": dg.MetadataValue.int(report.height),
            "batch_rows": dg.MetadataValue.int(expected.height),
            "mismatched_rows": dg.MetadataValue.int(wrong.height),
            "mismatches": dg.MetadataValue.md(report_diff.markdown(wrong, limit=20)),
        },
    }
