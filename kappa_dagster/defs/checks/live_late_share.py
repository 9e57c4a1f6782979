"""Warning check (not gating): days whose live late share exceeds ``KAPPA_LATE_RERUN_SHARE`` are re-run candidates.

Live windows close at the watermark, so late records are missing from a day's live results; its
corrected report (``reprocess``) counts them. The check only *suggests*: a WARN on ``raw_archive``
listing the candidate days and their share per live version; re-running stays a person's decision
(launch ``reprocess`` for those partitions). The ``late_share_check`` job runs it; so does the
check's "Execute" button in the UI.
"""

import dagster as dg

from kappa_dagster.defs.assets.raw_archive import raw_archive
from kappa_dagster.defs.resources import KappaResource
from kappa_dagster.replay.step import user_errors
from workers import late

SHOWN_DAYS = 30


@dg.asset_check(asset=raw_archive, blocking=False)
def live_late_share(kappa: KappaResource) -> dg.AssetCheckResult:
    """No day's live late records exceed KAPPA_LATE_RERUN_SHARE of its records (else: re-run candidates)."""
    with user_errors():
        threshold = late.rerun_share()
    settings = kappa.settings()
    rows = late.live_days(kappa.s3_client(settings), settings.s3_bucket, threshold)
    candidates = [(label, row) for label, row in rows if row.candidate]
    days = sorted({row.day for _label, row in candidates}, reverse=True)
    table = "\n".join(
        f"| {row.day} | {label} | {row.records:,} | {row.late:,} | {row.share:.4%} |"
        for label, row in candidates[:SHOWN_DAYS]
    )
    return dg.AssetCheckResult(
        passed=not candidates,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"re-run candidates (launch reprocess for these partitions): {', '.join(days)}" if days else None,
        metadata={
            "threshold": dg.MetadataValue.float(threshold),
            "candidate_days": dg.MetadataValue.text(", ".join(days) or "-"),
            "days_checked": dg.MetadataValue.int(len({row.day for _label, row in rows})),
            "max_late_share": dg.MetadataValue.float(max((r.share for _label, r in rows), default=0.0)),
            "candidates": dg.MetadataValue.md(
                "| day | live version | records | late | share |\n|---|---|---:|---:|---:|\n" + table
                if candidates else f"no day above {threshold:.2%} late"
            ),
        },
    )


late_share_check = dg.define_asset_job(
    "late_share_check",
    selection=dg.AssetSelection.checks(live_late_share),
    executor_def=dg.in_process_executor,
    description="Flag days whose live late share exceeds KAPPA_LATE_RERUN_SHARE (a WARN on raw_archive naming "
    "the candidate days for the reprocess job).",
)
