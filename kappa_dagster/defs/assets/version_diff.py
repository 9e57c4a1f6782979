"""The version diff per day: the candidate's corrected report against what users read, by cause.

The computation is ``workers.reports.version_diff``; this asset shows it to a reviewer before a
promote (a Markdown table per cause, one number per cause and measure for the Plots tab) and writes
``reports/<P>/v<V>/dt=<D>/diff.parquet``.
"""

from typing import Any

import dagster as dg

from kappa_dagster.defs.assets.replay import RANGE_POLICY
from kappa_dagster.defs.assets.reports import corrected_report
from kappa_dagster.defs.partitions import OWNERS, daily_partitions
from kappa_dagster.defs.resources import KappaResource, ReplayOptions
from kappa_dagster.replay.step import user_errors
from kappa_dagster.replay.target import targets_of
from workers.reports import diff as report_diff
from workers.reports import version_diff as diff_lib
from workers.reports.version_diff import VersionDiff


def diff_metadata(diff: VersionDiff) -> dict[str, Any]:
    """Numbers per cause (chartable across materializations) and the tables a reviewer reads."""
    numbers: dict[str, Any] = {}
    for cause, totals in diff.totals.items():
        slug = cause.replace(" ", "_")
        for name, value in totals.items():
            numbers[f"{slug}_{name}"] = (
                dg.MetadataValue.float(float(value)) if isinstance(value, float) else dg.MetadataValue.int(int(value))
            )
    rows = diff.frame.height
    return {
        "baseline": diff.baseline,
        "unexplained_groups": dg.MetadataValue.int(diff.unexplained),
        "differing_rows": dg.MetadataValue.int(rows),
        **numbers,
        "by_cause": dg.MetadataValue.md(report_diff.markdown(diff_lib.by_cause(diff.frame))),
        "rows": dg.MetadataValue.md(report_diff.markdown(diff.frame, limit=20)),
    }


@dg.asset(
    name="version_diff",
    partitions_def=daily_partitions,
    backfill_policy=RANGE_POLICY,  # diffing a year of corrected reports is one run, as reprocessing it is
    owners=OWNERS,
    group_name="reports",
    kinds={"s3", "parquet"},
    deps=[corrected_report],
)
def version_diff_asset(
    context: dg.AssetExecutionContext, kappa: KappaResource, replay: ReplayOptions
) -> dg.MaterializeResult:
    """``reports/<P>/v<V>/dt=<D>/diff.parquet``: every difference between the corrected report and what
    users read for the day, attributed to duplicates, late, malformed or a logic change. A range run
    diffs each day apart: one diff file and one set of numbers per day."""
    settings = kappa.settings()
    client = kappa.s3_client(settings)
    late_source = diff_lib.late_topic_source(settings)
    days: dict[str, dict[str, Any]] = {}
    for target in targets_of(context, replay):
        with user_errors():
            diff = diff_lib.compute(client, settings.s3_bucket, settings.events_topic, target.pipeline,
                                    target.version, target.day, late_source=late_source)
            key = diff_lib.write(client, settings.s3_bucket, diff)
        context.log.info(diff.line())
        days[target.day] = {"path": f"s3://{settings.s3_bucket}/{key}", **diff_metadata(diff)}
    if len(days) == 1:
        (metadata,) = days.values()
        return dg.MaterializeResult(metadata=metadata)
    for day, metadata in days.items():
        context.add_asset_metadata(metadata, partition_key=day)
    unexplained = sum(int(m["unexplained_groups"].value) for m in days.values())
    return dg.MaterializeResult(metadata={"days": dg.MetadataValue.int(len(days)),
                                          "unexplained_groups": dg.MetadataValue.int(unexplained)})
