"""The replay manifest: the one record of a replay slot (what was loaded, consumed, checked).

It lives at ``keys.replay_manifest(slot)``; every write is a compare-and-swap on the ETag it was read
at, so a run that lost its slot (a zombie loader, a run whose lease was taken) can never overwrite it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal, get_args

from botocore.exceptions import ClientError

from workers import keys
from workers import s3 as s3_helpers
from workers.errors import KappaError

#: Grace of the bounded processor over a replay topic (see :func:`processor_grace_ms`).
ORDERED_REPLAY_GRACE_MS = 0

RUN_TOKEN_RE = r"^[a-z0-9]{1,12}$"


def replay_id(pipeline: str, version: int, day: str, bucket: str, source_topic: str) -> str:
    """Stable id of one replay slot: ``orders-v2-20261120-1a2b3c`` (where its manifest and lease live).

    Derived only from what is replayed (pipeline, version, day) plus a short hash of the archive
    (bucket + topic), so re-runs find their predecessor and two archives sharing a cluster never collide.
    """
    keys.valid_name(pipeline)
    keys.valid_version(version)
    keys.valid_day(day)
    source = hashlib.sha1(f"{bucket}/{source_topic}".encode()).hexdigest()[:6]
    return keys.valid_replay_id(f"{pipeline.replace('_', '-')}-v{version}-{day.replace('-', '')}-{source}")


#: The states of a replay, in order: ``loading -> loaded -> consumed -> reported | rejected``.
Status = Literal["loading", "loaded", "consumed", "reported", "rejected"]
STATUSES: tuple[Status, ...] = get_args(Status)


@dataclass
class ReplayManifest:
    """The stored record of one replay slot; mutable because its status advances in place.

    A field at its default (None, False, empty) is not stored, and a missing key or a null reads as the
    default: manifests written before a field existed still load. Keys this version does not know land
    in ``extra`` and are written back unchanged, so a read-modify-write never drops another writer's.
    """

    # identity: what is replayed, from which archive topic, and how far it got
    replay_id: str
    pipeline: str
    version: int
    day: str
    source_topic: str
    status: Status
    # written when the load starts (``loader.load``); slot None: a manifest from before slots (= replay_id)
    slot: str | None = None
    replay_topic: str | None = None
    group: str | None = None
    partitions_requested: int | None = None  # None: mirror the source topic's partitions
    partitioning: str | None = None  # "source" or "key"
    partitions: int | None = None
    dlq_topic: str | None = None
    #: the replay's own late topic (``<replay topic>.late``), like its DLQ; None in older manifests
    late_topic: str | None = None
    processor_prefix: str | None = None
    #: a many-day replay (``loader.load_range``): its id and every day sharing its topic and group;
    #: None for a one-day replay. Each day keeps its own manifest (snapshot, records, checks).
    range_id: str | None = None
    range_days: list[str] | None = None
    report_key: str | None = None
    source_fingerprint: str | None = None
    #: provenance: the data version of raw_archive[day] this replay (and its report) was computed from
    archive_fingerprint: str | None = None
    #: every replay partition is in (timestamp, partition, offset) order: see processor_grace_ms
    event_time_ordered: bool = False
    source_files: int | None = None
    #: the exact snapshot (what the fingerprint digests) as ``[key, size, etag]``: the gate's reference reads these
    source_objects: list[list[Any]] | None = None
    source_bytes: int | None = None
    started_at: str | None = None
    # loaded
    records: int | None = None
    rows_read: int | None = None
    duplicates_dropped: int | None = None
    end_offsets: dict[str, int] | None = None  # of the replay topic, as ``kafka.offsets_json``
    source_end_offsets: dict[str, int] | None = None  # of the archived source partitions
    loaded_at: str | None = None
    load_seconds: float | None = None
    # consumed (``reports.gate.mark_consumed``): the report and stats versions the checks will read
    consumed_at: str | None = None
    report_etag: str | None = None
    stats_key: str | None = None
    stats_etag: str | None = None
    # checked (``reports.gate.publish``)
    checked_at: str | None = None
    checked_fingerprint: str | None = None
    checks: dict[str, bool] | None = None
    failed_checks: list[str] | None = None
    report_rows: int | None = None
    # cleanup
    cleaned: bool = False
    superseded_not_cleaned: list[str] = field(default_factory=list)
    #: stored keys this version does not know (kept and written back as they were)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the S3 version this manifest was read at or last written as (never stored): the fence of the next write
    etag: str | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """Where it lives: ``keys.replay_manifest`` of its slot."""
        return keys.replay_manifest(self.slot or self.replay_id)


_NOT_STORED = frozenset({"extra", "etag"})
_FIELDS = {f.name: f for f in fields(ReplayManifest) if f.name not in _NOT_STORED}
_REQUIRED = tuple(name for name, f in _FIELDS.items() if f.default is MISSING and f.default_factory is MISSING)


def _stored(f: Field, value: Any) -> bool:
    """Whether a field goes into the JSON: always when required, otherwise unless it is at its default."""
    if f.name in _REQUIRED:
        return True
    return bool(value != (f.default_factory() if f.default_factory is not MISSING else f.default))


def to_json(manifest: ReplayManifest) -> bytes:
    """The stored form: the known fields not at their default, plus ``extra``, keys sorted."""
    stored = dict(manifest.extra)
    for name, f in _FIELDS.items():
        value = getattr(manifest, name)
        if _stored(f, value):
            stored[name] = value
    return json.dumps(stored, indent=2, sort_keys=True).encode()


def from_json(body: bytes | str, etag: str | None = None) -> ReplayManifest:
    """Parse a stored manifest; unknown keys go to ``extra``, a missing identity key is an error."""
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise KappaError(f"a replay manifest is a JSON object, got {type(doc).__name__}")
    missing = [name for name in _REQUIRED if name not in doc]
    if missing:
        raise KappaError(f"replay manifest {doc.get('replay_id', '?')!r} lacks {', '.join(missing)}")
    if doc["status"] not in STATUSES:
        raise KappaError(f"replay manifest {doc['replay_id']!r} has unknown status {doc['status']!r}")
    known = {name: doc.pop(name) for name in list(doc) if name in _FIELDS}
    known = {name: value for name, value in known.items() if value is not None or name in _REQUIRED}
    known["version"] = int(known["version"])
    return ReplayManifest(**known, extra=doc, etag=etag)


class ManifestFenced(KappaError):
    """Another run wrote the manifest since this one read it: this run no longer owns the replay."""


def read_manifest(client: Any, bucket: str, slot: str) -> ReplayManifest | None:
    """The slot's manifest, remembering its ETag so that :func:`write_manifest` can fence on it."""
    found = s3_helpers.get_stored(client, bucket, keys.replay_manifest(slot))
    return from_json(found.body, found.etag) if found else None


def write_manifest(client: Any, bucket: str, manifest: ReplayManifest) -> None:
    """One conditional PUT over the version this manifest was read at (create-only when it was new).

    Readers see the old or the new manifest, never a mix; a writer whose version is no longer the
    current one (a zombie loader, a run that lost its lease) gets :class:`ManifestFenced`.
    """
    try:
        manifest.etag = s3_helpers.put_if(client, bucket, manifest.key, to_json(manifest), manifest.etag)
    except s3_helpers.Fenced:
        raise ManifestFenced(
            f"replay {manifest.replay_id}: another run rewrote s3://{bucket}/{manifest.key} since this one read it; "
            "this run no longer owns the replay and stops without writing"
        ) from None


def iter_manifests(client: Any, bucket: str) -> Iterator[ReplayManifest]:
    """Every replay manifest in the bucket (for the progress sensor and promote)."""
    for obj in s3_helpers.iter_keys(client, bucket, "_state/replays/"):
        if obj["Key"].endswith("/manifest.json"):
            found = s3_helpers.get_stored(client, bucket, obj["Key"])
            if found:
                yield from_json(found.body, found.etag)


def range_id(pipeline: str, version: int, days: list[str], bucket: str, source_topic: str) -> str:
    """Stable id of a many-day replay: ``orders-v2-20261120-20261126-1a2b3c`` (first and last day).

    The hash covers the archive and every day, so two ranges with the same ends but other days never share
    a topic.
    """
    if not days:
        raise KappaError("a replay range needs at least one day")
    for day in days:
        keys.valid_day(day)
    digest = hashlib.sha1(f"{bucket}/{source_topic}/{','.join(sorted(days))}".encode()).hexdigest()[:6]
    first, last = min(days).replace("-", ""), max(days).replace("-", "")
    return keys.valid_replay_id(f"{keys.valid_name(pipeline).replace('_', '-')}-v{keys.valid_version(version)}-"
                                f"{first}-{last}-{digest}")


def range_slots(manifest: ReplayManifest) -> dict[str, str]:
    """Day -> slot of the other days sharing this manifest's replay topic (empty for a one-day replay).

    A slot ends in its archive's hash (bucket and topic, not stored in the manifest), the same for every
    day of one archive, so the siblings' slots are this slot with the day swapped.
    """
    source = (manifest.slot or manifest.replay_id).rsplit("-", 1)[-1]
    name = manifest.pipeline.replace("_", "-")
    return {
        day: keys.valid_replay_id(f"{name}-v{manifest.version}-{day.replace('-', '')}-{source}")
        for day in manifest.range_days or []
        if day != manifest.day
    }


def processor_grace_ms(manifest: ReplayManifest) -> int | None:
    """Watermark grace the bounded processor uses on this replay topic (``--grace-seconds``).

    The loader writes the whole day in ``(timestamp, partition, offset)`` order, so every replay
    partition is in event-time order and no record can be late with grace 0: windows close as soon
    as the next one starts and the processor keeps about one window (plus its dedup keys) per
    partition instead of the whole day, with exactly the same report. Manifests written before
    this flag existed (or a topic of unknown order) keep the infinite grace (None).
    """
    return ORDERED_REPLAY_GRACE_MS if manifest.event_time_ordered else None


#: Manifest statuses whose replay topic is complete (loaded, then consumed, then checked).
LOADED_STATES: set[Status] = {"loaded", "consumed", "reported", "rejected"}


def published(client: Any, bucket: str, manifest: ReplayManifest) -> bool:
    """True when the slot's report passed its checks and the file is still the version that was checked."""
    if manifest.status != "reported" or not manifest.report_etag or not manifest.report_key:
        return False
    try:
        head = client.head_object(Bucket=bucket, Key=manifest.report_key)
    except ClientError:
        return False
    return bool(head["ETag"] == manifest.report_etag)


