"""The gate of a corrected report: checked against the SQL reference, then (only then) published.

A report file can be rewritten by a stray processor, so the gate binds and checks exact ETags and
moves the manifest ``consumed -> reported | rejected`` in one fenced write (docs/ARCHITECTURE.md,
"The reference and the gate").
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from workers import keys
from workers import s3 as s3_helpers
from workers.errors import KappaError
from workers.pipelines import get_pipeline
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest
from workers.reports import reference
from workers.reports import stats as report_stats
from workers.reports.stats import ReportStats

#: The blocking checks; a report is published only when all pass.
REFERENCE_CHECK = "report_matches_reference"
ACCOUNTED_CHECK = "records_accounted"
STAT_OUTCOMES = ("counted", "dlq", "duplicates", "late")


@dataclass
class Check:
    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    checks: list[Check]
    fingerprint: str
    report: bytes
    stats: ReportStats

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _head_etag(client: Any, bucket: str, key: str) -> str | None:
    try:
        return str(client.head_object(Bucket=bucket, Key=key)["ETag"])
    except ClientError:
        return None


def mark_consumed(
    client: Any, bucket: str, manifest: ReplayManifest, summary: dict[str, Any]
) -> ReplayManifest:
    """After a bounded processor run over this load: bind the report it wrote, or explain why not.

    ``summary`` is the processor's run summary (``RunSummary.to_dict``): it must be complete, have
    written the day's report, and have seen exactly the replay's records.
    """
    day, records = manifest.day, manifest.records
    stats = (summary.get("stats") or {}).get(day, {})
    if not summary.get("complete") or day not in (summary.get("reports") or {}):
        raise KappaError(f"the replay consumer of {day} did not finish and write its report: run it again")
    if summary.get("group") != manifest.group or stats.get("records") != records:
        raise KappaError(
            f"processor saw {stats.get('records')} records for {day} in group {summary.get('group')}, "
            f"the replay {manifest.replay_id} holds {records} in group {manifest.group}"
        )
    stats_key = keys.report_stats_file(manifest.pipeline, manifest.version, day)
    manifest.status = "consumed"
    manifest.consumed_at = _now()
    manifest.report_etag = _head_etag(client, bucket, manifest.report_key)
    manifest.stats_key = stats_key
    manifest.stats_etag = _head_etag(client, bucket, stats_key)
    replay_manifest.write_manifest(client, bucket, manifest)
    return manifest


def _read_bound(client: Any, bucket: str, key: str, etag: str | None, day: str) -> bytes:
    """The file at the version the consume step bound, or a clear error."""
    if not etag:
        raise KappaError(f"the replay of {day} has not been consumed yet: run the reprocess job for {day}")
    try:
        return s3_helpers.get_if(client, bucket, key, etag)
    except s3_helpers.Fenced:
        raise KappaError(
            f"s3://{bucket}/{key} was rewritten or removed after the consume step of {day}: reprocess {day}"
        ) from None


def evaluate(client: Any, bucket: str, manifest: ReplayManifest) -> Verdict:
    """Both blocking checks of the consumed report, against the load's exact archive snapshot."""
    pipeline = get_pipeline(manifest.pipeline, manifest.version)
    day = manifest.day
    report = _read_bound(client, bucket, manifest.report_key, manifest.report_etag, day)
    stats = report_stats.from_json(_read_bound(client, bucket, manifest.stats_key, manifest.stats_etag, day))
    try:  # the snapshot the replay was loaded from, even if late records were archived since
        with reference.snapshot(client, bucket, manifest.source_topic, day, manifest.source_objects) as snap:
            ref = reference.compute(pipeline, snap)
    except reference.SnapshotChanged as exc:
        raise KappaError(f"the archive of {day} was rewritten since its replay was loaded ({exc}): reprocess") from None
    columns, rows = reference.read_report(report, pipeline.key_columns)
    wrong = reference.mismatches(columns, rows, ref, pipeline.key_columns)
    return Verdict([_reference_check(manifest, ref, stats, wrong), _accounted_check(ref, stats, columns, rows)],
                   ref.fingerprint, report, stats)


def _reference_check(
    manifest: ReplayManifest, ref: reference.Reference, stats: ReportStats, wrong: list
) -> Check:
    counts = stats.as_dict()
    fresh = ref.fingerprint == manifest.source_fingerprint
    outcome_diff = {
        name: {"report": counts[name], "reference": ref.outcomes[name]}
        for name in reference.OUTCOMES
        if counts[name] != ref.outcomes[name]
    }
    if not fresh:
        why = "the archive objects read differ from the snapshot the replay was loaded from"
    elif wrong or outcome_diff:
        why = f"{len(wrong)} report rows and {len(outcome_diff)} outcome counts differ from the SQL reference"
    else:
        why = f"equal to the SQL reference ({len(ref.rows)} rows, {ref.records} records)"
    return Check(
        REFERENCE_CHECK,
        fresh and not wrong and not outcome_diff,
        why,
        {
            "reference_rows": len(ref.rows),
            "mismatched_rows": len(wrong),
            "mismatches": [_printable(w) for w in wrong[:20]],
            "outcome_differences": outcome_diff,
            "reference_outcomes": ref.outcomes,
            "archive_fingerprint": ref.fingerprint,
            "loaded_fingerprint": manifest.source_fingerprint,
        },
    )


def _accounted_check(ref: reference.Reference, stats: ReportStats, columns: list[str], rows: list[tuple]) -> Check:
    counts = stats.as_dict()
    outcomes = sum(counts[name] for name in STAT_OUTCOMES)
    events = sum(int(row[columns.index("events")]) for row in rows) if "events" in columns else None
    passed = outcomes == ref.records == stats.records and events in (None, stats.counted)
    return Check(
        ACCOUNTED_CHECK,
        passed,
        f"counted + dlq + duplicates + late = {outcomes}, distinct archive records = {ref.records}",
        {"archive_records": ref.records, "accounted": outcomes, "report_events": events, "stats": counts},
    )


def _printable(row: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in row.items()}


def publish(
    client: Any, bucket: str, manifest: ReplayManifest, verdict: Verdict
) -> ReplayManifest:
    """One fenced manifest write: ``reported`` when every blocking check passed, else ``rejected``."""
    manifest.status = "reported" if verdict.passed else "rejected"
    manifest.checked_at = _now()
    manifest.checked_fingerprint = verdict.fingerprint
    manifest.checks = {check.name: check.passed for check in verdict.checks}
    manifest.failed_checks = verdict.failed
    replay_manifest.write_manifest(client, bucket, manifest)
    return manifest
