"""Check: every archived record of the day is accounted for exactly once by the processor's stats."""

import dagster as dg
from dagster_aws.s3 import S3Resource

from kappa_dagster.archive_reads import archive_day
from kappa_dagster.defs.assets.reports import corrected_report, read_report
from kappa_dagster.defs.partitions import daily_partitions
from kappa_dagster.defs.resources import KafkaResource, ReplayOptions
from kappa_dagster.replay_target import target_of

OUTCOMES = ("counted", "dlq", "duplicates", "late")


@dg.asset_check(asset=corrected_report, partitions_def=daily_partitions, blocking=True)
def records_accounted(
    context: dg.AssetCheckExecutionContext, s3: S3Resource, kafka: KafkaResource, replay: ReplayOptions
) -> dg.AssetCheckResult:
    """counted + dlq + duplicates + late == distinct archive records, and the report sums to counted."""
    target = target_of(context, replay)
    settings = kafka.settings()
    client = s3.get_client()
    report, stats = read_report(client, settings.s3_bucket, target)
    archived = archive_day(client, settings, target).height
    outcomes = sum(int(stats.get(name, 0)) for name in OUTCOMES)
    report_events = int(report["events"].sum())
    return dg.AssetCheckResult(
        passed=outcomes == archived == int(stats.get("records", -1)) and report_events == int(stats.get("counted", -1)),
        metadata={
            "archive_records": dg.MetadataValue.int(archived),
            "accounted": dg.MetadataValue.int(outcomes),
            "report_events": dg.MetadataValue.int(report_events),
            **{name: dg.MetadataValue.int(int(stats.get(name, 0))) for name in ("records", *OUTCOMES)},
        },
    )
