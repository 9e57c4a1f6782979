"""Nightly reprocess of the last N days (late data lands in past days' prefixes).

``KAPPA_NIGHTLY_DAYS`` (default 3) days before the tick's date, one run request per partition. The
version is the promoted one (``reports/<P>/CURRENT``), else the default. Days whose archive did not
change are cheap: the replay load and consume are reused (same archive fingerprint).
"""

import datetime as dt
import os

import dagster as dg

from kappa_dagster.defs.jobs import reprocess
from kappa_dagster.defs.partitions import daily_partitions
from kappa_dagster.defs.resources import KappaResource
from kappa_dagster.replay.target import DEFAULT_PIPELINE, DEFAULT_VERSION, PIPELINE_TAG, VERSION_TAG
from workers import promote


def nightly_days() -> int:
    return max(1, int(os.environ.get("KAPPA_NIGHTLY_DAYS", "3")))


def recent_days(tick: dt.datetime, count: int) -> list[str]:
    """The ``count`` days before the tick's UTC date that are partitions."""
    known = set(daily_partitions.get_partition_keys(current_time=tick))
    days = [(tick.date() - dt.timedelta(days=back)).isoformat() for back in range(count, 0, -1)]
    return [day for day in days if day in known]


@dg.schedule(
    job=reprocess,
    cron_schedule=os.environ.get("KAPPA_NIGHTLY_CRON", "0 2 * * *"),
    execution_timezone="UTC",
    description="Re-run the last KAPPA_NIGHTLY_DAYS days (default 3) with the promoted version.",
)
def nightly_reprocess(context: dg.ScheduleEvaluationContext, kappa: KappaResource) -> list[dg.RunRequest]:
    tick = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
    settings = kappa.settings()
    promoted = promote.current_version(kappa.s3_client(settings), settings.s3_bucket, DEFAULT_PIPELINE)
    version = promoted or DEFAULT_VERSION
    return [
        dg.RunRequest(
            run_key=f"nightly:{tick:%Y-%m-%d}:{day}",
            partition_key=day,
            tags={VERSION_TAG: str(version), PIPELINE_TAG: DEFAULT_PIPELINE},
        )
        for day in recent_days(tick, nightly_days())
    ]
