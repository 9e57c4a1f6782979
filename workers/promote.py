"""Promote / roll back a pipeline version: one atomic write of ``reports/<P>/CURRENT``.

One PUT means readers see the old or the new pointer, never a mix; the pointer keeps its history so
a rollback is one PUT too, and it records the switch the live processor hands off at.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any

from botocore.exceptions import ClientError

from workers import keys
from workers import s3 as s3_helpers
from workers.archive import stats as archive_stats
from workers.config import Settings
from workers.errors import KappaError
from workers.processor import handoff
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest

MAX_HISTORY = 50


def read_current(client: Any, bucket: str, pipeline: str) -> dict[str, Any] | None:
    body = s3_helpers.get_bytes(client, bucket, keys.current_pointer(pipeline))
    return json.loads(body) if body else None


def current_version(client: Any, bucket: str, pipeline: str) -> int | None:
    pointer = read_current(client, bucket, pipeline)
    return int(pointer["version"]) if pointer else None


def _write(client: Any, bucket: str, pipeline: str, pointer: dict[str, Any]) -> None:
    body = json.dumps(pointer, indent=2, sort_keys=True).encode()
    client.put_object(Bucket=bucket, Key=keys.current_pointer(pipeline), Body=body, ContentType="application/json")


def replayed(client: Any, bucket: str, pipeline: str, version: int, source_topic: str) -> list[ReplayManifest]:
    """Manifests of this version's replays whose report has been produced."""
    return sorted(
        (
            m
            for m in replay_manifest.iter_manifests(client, bucket)
            if m.pipeline == pipeline
            and m.version == version
            and m.source_topic == source_topic
            and m.status == "reported"
        ),
        key=lambda m: m.day,
    )


def refused_days(client: Any, bucket: str, pipeline: str, version: int, source_topic: str) -> dict[str, str]:
    """Replayed days of this version that may not be promoted, with why (a report is
    promotable only once its blocking checks passed, for the archive snapshot it was computed from)."""
    current = archive_stats.days_fingerprints(client, bucket, source_topic)
    ours = (pipeline, version, source_topic)
    refused = {}
    for manifest in replay_manifest.iter_manifests(client, bucket):
        if (manifest.pipeline, manifest.version, manifest.source_topic) != ours:
            continue
        day, status = manifest.day, manifest.status
        if status == "rejected":
            refused[day] = f"checks failed: {', '.join(manifest.failed_checks or []) or 'see the run'}"
        elif status != "reported":
            refused[day] = f"not checked yet (replay {status})"
        elif manifest.checked_fingerprint != current.get(day):
            refused[day] = "the archive changed since its checks (stale): reprocess it"
        elif not replay_manifest.published(client, bucket, manifest):
            refused[day] = "report.parquet changed since its checks: reprocess it"
    return dict(sorted(refused.items()))


def source_partitions(manifests: list[ReplayManifest]) -> int:
    """Partitions of the events topic as the replays saw them (a source-mode replay mirrors all of them)."""
    mirrored = [m.partitions for m in manifests if m.partitioning == "source" and m.partitions is not None]
    archived = [int(p) + 1 for m in manifests for p in m.source_end_offsets or {}]
    return max([*mirrored, *archived], default=0)


def report_etags(client: Any, bucket: str, pipeline: str, version: int, days: list[str]) -> dict[str, str]:
    """The exact report objects promoted: one recomputed later no longer matches the switch."""
    etags = {}
    for day in days:
        with contextlib.suppress(ClientError):
            etags[day] = client.head_object(Bucket=bucket, Key=keys.report_file(pipeline, version, day))["ETag"]
    return etags


def uncovered_days(client: Any, bucket: str, source_topic: str, days: set[str], offsets: dict[str, int]) -> list[str]:
    """Archived days not replayed that hold offsets below the start offsets (a gap if started there)."""
    gaps = []
    for day, files in archive_stats.days_listing(client, bucket, source_topic).items():
        if day in days:
            continue
        for key, _size in files:
            parts = keys.parse_raw_file(key) or {}
            if int(parts["first_offset"]) < offsets.get(str(parts["partition"]), 0):
                gaps.append(day)
                break
    return sorted(gaps)


def version_diffs(
    client: Any, bucket: str, source_topic: str, pipeline: str, version: int, days: list[str], max_unexplained: int,
    settings: Settings | None = None,
) -> dict[str, str]:
    """One summary line per day of the diff against what users read; refuses when more (window, group)
    rows than ``max_unexplained`` differ for no known cause (a logic change)."""
    from workers.reports import version_diff  # imported here: the diff reads the dashboard's sources, which read us

    late = None if settings is None else version_diff.late_topic_source(settings)
    diffs = {day: version_diff.compute(client, bucket, source_topic, pipeline, version, day, late_source=late)
             for day in days}
    unexplained = {day: diff.unexplained for day, diff in diffs.items() if diff.unexplained}
    if sum(unexplained.values()) > max_unexplained:
        listing = ", ".join(f"{day}: {count}" for day, count in unexplained.items())
        raise KappaError(
            f"{pipeline} v{version} not promoted: {sum(unexplained.values())} (window, group) rows differ for no "
            f"known cause (logic change; {listing}), more than --max-unexplained {max_unexplained}"
        )
    return {day: diff.line() for day, diff in diffs.items()}


def check_arguments(pipeline: str, version: int, max_unexplained: int | None) -> None:
    """What a promotion is asked, checked before anything is read (``kappa promote`` calls it before the broker)."""
    keys.valid_name(pipeline)
    keys.valid_version(version)
    if max_unexplained is not None and max_unexplained < 0:
        raise KappaError(f"--max-unexplained must be >= 0, got {max_unexplained}")


def promote(
    client: Any, bucket: str, source_topic: str, pipeline: str, version: int, max_unexplained: int | None = 0,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Point ``CURRENT`` at ``version`` (which must have corrected reports) and return the new pointer.

    With ``max_unexplained`` set (default 0) the version diff of every day must explain all but that
    many differing rows; None skips the diff. ``settings`` (Kafka) let the diff read the late topic of
    a live baseline with a state key."""
    check_arguments(pipeline, version, max_unexplained)
    refused = refused_days(client, bucket, pipeline, version, source_topic)
    if refused:
        listing = "; ".join(f"{day}: {why}" for day, why in refused.items())
        count = len(refused)
        raise KappaError(f"{pipeline} v{version} cannot be promoted, {count} day(s) unchecked or failed: {listing}")
    manifests = replayed(client, bucket, pipeline, version, source_topic)
    if not manifests:
        raise KappaError(
            f"no corrected reports of {pipeline} v{version} in s3://{bucket}/reports/{pipeline}/v{version}/: "
            "run the reprocess job first"
        )
    switch = handoff.Switch.plan(manifests, source_partitions(manifests))
    offsets = {str(p): o for p, o in sorted(switch.start.items())}
    days = [m.day for m in manifests]
    diffs = {}
    if max_unexplained is not None:
        diffs = version_diffs(client, bucket, source_topic, pipeline, version, sorted(set(days)), max_unexplained,
                              settings)
    previous = read_current(client, bucket, pipeline)
    history = []
    if previous is not None:
        history = [*previous.pop("history", []), previous][-MAX_HISTORY:]
    pointer = {
        "pipeline": pipeline,
        "version": version,
        "reports_prefix": f"reports/{pipeline}/v{version}/",
        "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "days": days,
        "source_topic": source_topic,
        "live_start_offsets": offsets,
        "switch": switch.to_json(),
        "report_etags": report_etags(client, bucket, pipeline, version, days),
        "uncovered_days": uncovered_days(client, bucket, source_topic, set(days), offsets),
        "diffs": diffs,
        "history": history,
    }
    _write(client, bucket, pipeline, pointer)
    return pointer


def rollback(client: Any, bucket: str, pipeline: str) -> dict[str, Any] | None:
    """Restore the previous pointer; after the first promotion, remove ``CURRENT`` (back to live)."""
    current = read_current(client, bucket, pipeline)
    if current is None:
        raise KappaError(f"{pipeline} has no promoted version (no reports/{pipeline}/CURRENT): nothing to roll back")
    history = current.get("history", [])
    if not history:
        client.delete_object(Bucket=bucket, Key=keys.current_pointer(pipeline))
        return None
    restored = {**history[-1], "history": history[:-1]}
    _write(client, bucket, pipeline, restored)
    return restored


def start_offsets_arg(pointer: dict[str, Any]) -> str:
    """The start offsets as JSON (``kappa processor --handoff`` reads them, and the covered days, itself)."""
    return json.dumps(pointer["live_start_offsets"], separators=(",", ":"))
