"""Where every replay stands: manifest (S3) + replay group lag (Kafka offsets) -> one row per replay.

Shared by ``kappa replay status`` and the dashboard. A replay's total is the end offsets its load
recorded in the manifest, its progress is the replay group's committed offsets; nothing consumes.
Rates need two observations, so callers keep a :class:`RateTracker` across calls.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from botocore.exceptions import ClientError

from workers import s3 as s3_helpers
from workers.config import Settings
from workers.lag import GroupLag, LagReader
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest

#: Rates are averaged over this many seconds of observations.
RATE_WINDOW_S = 30.0


class RateTracker:
    """Records/s per key from successive ``(time, done)`` observations, over a sliding window."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, key: str, done: int, now: float | None = None) -> float | None:
        """Add an observation; the rate over the window, or None until there are two."""
        now = time.monotonic() if now is None else now
        samples = self.samples.setdefault(key, deque())
        samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > self.window_s:
            samples.popleft()
        (t0, d0), (t1, d1) = samples[0], samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None


@dataclass(frozen=True)
class ReplayRow:
    """One replay as a person wants to see it."""

    replay_id: str
    pipeline: str
    version: int
    day: str
    group: str
    topic: str
    source_topic: str | None
    total: int
    consumed: int
    lag: int
    rate: float | None
    eta_s: float | None
    state: str

    @property
    def percent(self) -> float:
        return 100.0 * self.consumed / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "percent": round(self.percent, 1)}


#: What the manifest status says once the consumer is done (see ``workers.reports.gate``).
FINISHED_STATES = {"consumed": "checking", "rejected": "checks failed", "reported": "reported"}


def replay_state(manifest: ReplayManifest, lag: GroupLag | None, report_exists: bool) -> str:
    """loading -> waiting (no commit yet) -> consuming -> caught up -> checking -> reported (or checks
    failed); 'done' once a reported replay's topic is cleaned up. A report file alone proves nothing:
    it may be an earlier load's (``report_exists`` is kept for callers, the status decides)."""
    status = manifest.status
    if status == "loading":
        return "loading"
    if status in FINISHED_STATES:
        return "done" if status == "reported" and lag is None else FINISHED_STATES[status]
    if lag is None:
        return "topic missing"
    if not lag.started:
        return "waiting"
    return "caught up" if lag.lag == 0 else "consuming"


def manifest_end(manifest: ReplayManifest) -> dict[int, int] | None:
    """The end offsets the load recorded (None while it is still loading: use the live watermarks)."""
    end = manifest.end_offsets
    if manifest.status == "loading" or not end:
        return None
    return {int(p): int(o) for p, o in end.items()}


def progress(reader: LagReader, manifest: ReplayManifest) -> GroupLag | None:
    """The replay group's committed offsets against the end offsets its load recorded (the live
    watermarks while it loads); None once its topic is cleaned up. The one progress computation:
    ``kappa replay status``, the dashboard and the Dagster sensor all read it."""
    if reader.partitions(manifest.replay_topic) is None:
        return None
    return reader.group_lag(manifest.group, manifest.replay_topic, manifest_end(manifest))


def replay_row(
    manifest: ReplayManifest, lag: GroupLag | None, report_exists: bool, rates: RateTracker
) -> ReplayRow:
    total = lag.end_total if lag is not None else int(manifest.records or 0)
    finished = manifest.status in FINISHED_STATES
    consumed = total if finished else (lag.consumed if lag is not None else 0)
    remaining = max(total - consumed, 0)
    rate = rates.observe(manifest.replay_id, consumed)
    eta = remaining / rate if rate and rate > 0 and remaining else (0.0 if not remaining else None)
    return ReplayRow(
        replay_id=manifest.replay_id,
        pipeline=manifest.pipeline,
        version=manifest.version,
        day=manifest.day,
        group=manifest.group or "?",
        topic=manifest.replay_topic or "?",
        source_topic=manifest.source_topic,
        total=total,
        consumed=consumed,
        lag=remaining,
        rate=rate,
        eta_s=eta,
        state=replay_state(manifest, lag, report_exists),
    )


def replay_rows(settings: Settings, reader: LagReader, rates: RateTracker, client: Any = None) -> list[ReplayRow]:
    """Every replay of the bucket, newest day first."""
    client = client or s3_helpers.s3_client(settings)
    rows = []
    for manifest in replay_manifest.iter_manifests(client, settings.s3_bucket):
        lag = progress(reader, manifest)
        report_key = manifest.report_key
        report_exists = bool(report_key) and object_exists(client, settings.s3_bucket, report_key)
        rows.append(replay_row(manifest, lag, report_exists, rates))
    return sorted(rows, key=lambda row: (row.day, row.replay_id), reverse=True)


def object_exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


def format_eta(seconds: float | None) -> str:
    """``95`` -> ``1m35s``; None -> ``?``."""
    if seconds is None:
        return "?"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
