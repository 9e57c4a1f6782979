"""The replay manifest: the one record of a replay slot (what was loaded, consumed, checked).

It lives at ``keys.replay_manifest(slot)``; every write is a compare-and-swap on the ETag it was read
at, so a run that lost its slot (a zombie loader, a run whose lease was taken) can never overwrite it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

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


#: Where a manifest dict remembers the S3 version it was read at (never stored in S3).
ETAG = "_etag"


class ManifestFenced(KappaError):
    """Another run wrote the manifest since this one read it: this run no longer owns the replay."""


def _loaded(body: bytes, etag: str) -> dict[str, Any]:
    manifest = json.loads(body)
    manifest[ETAG] = etag
    return manifest


def read_manifest(client: Any, bucket: str, slot: str) -> dict[str, Any] | None:
    """The slot's manifest, remembering its ETag so that :func:`write_manifest` can fence on it."""
    found = s3_helpers.get_stored(client, bucket, keys.replay_manifest(slot))
    return _loaded(found.body, found.etag) if found else None


def write_manifest(client: Any, bucket: str, manifest: dict[str, Any]) -> None:
    """One conditional PUT over the version this dict was read at (create-only when it was new).

    Readers see the old or the new manifest, never a mix; a writer whose version is no longer the
    current one (a zombie loader, a run that lost its lease) gets :class:`ManifestFenced`.
    """
    stored = {k: v for k, v in manifest.items() if k != ETAG}
    body = json.dumps(stored, indent=2, sort_keys=True).encode()
    key = keys.replay_manifest(manifest.get("slot") or manifest["replay_id"])
    try:
        manifest[ETAG] = s3_helpers.put_if(client, bucket, key, body, manifest.get(ETAG))
    except s3_helpers.Fenced:
        raise ManifestFenced(
            f"replay {manifest['replay_id']}: another run rewrote s3://{bucket}/{key} since this one read it; "
            "this run no longer owns the replay and stops without writing"
        ) from None


def iter_manifests(client: Any, bucket: str) -> Iterator[dict[str, Any]]:
    """Every replay manifest in the bucket (for the progress sensor and promote)."""
    for obj in s3_helpers.iter_keys(client, bucket, "_state/replays/"):
        if obj["Key"].endswith("/manifest.json"):
            found = s3_helpers.get_stored(client, bucket, obj["Key"])
            if found:
                yield _loaded(found.body, found.etag)


def processor_grace_ms(manifest: dict[str, Any]) -> int | None:
    """Watermark grace the bounded processor uses on this replay topic (``--grace-seconds``).

    The loader writes the whole day in ``(timestamp, partition, offset)`` order, so every replay
    partition is in event-time order and no record can be late with grace 0: windows close as soon
    as the next one starts and the processor keeps about one window (plus its dedup keys) per
    partition instead of the whole day, with exactly the same report. Manifests written before
    this flag existed (or a topic of unknown order) keep the infinite grace (None).
    """
    return ORDERED_REPLAY_GRACE_MS if manifest.get("event_time_ordered") else None


#: Manifest statuses whose replay topic is complete (loaded, then consumed, then checked).
LOADED_STATES = {"loaded", "consumed", "reported", "rejected"}


def published(client: Any, bucket: str, manifest: dict[str, Any]) -> bool:
    """True when the slot's report passed its checks and the file is still the version that was checked."""
    if manifest.get("status") != "reported" or not manifest.get("report_etag"):
        return False
    try:
        head = client.head_object(Bucket=bucket, Key=manifest["report_key"])
    except ClientError:
        return False
    return bool(head["ETag"] == manifest["report_etag"])


