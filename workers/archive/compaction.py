"""Compaction: rewrite a closed day's many small archive files into few large ones, switching atomically.

The archive is the source of truth, so nothing is switched before the new files are read back from
S3 and hold exactly the old files' records (count, content digest and an exact frame comparison).
Readers resolve a day through ``workers/archive/layout.py``; the steps and why each is safe are in
docs/ARCHITECTURE.md, "Compaction".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from confluent_kafka import Consumer, TopicPartition

from workers import kafka as kafka_helpers
from workers import keys
from workers import s3 as s3_helpers
from workers.archive import checkpoint as archiver_checkpoint
from workers.archive import format as archive_format
from workers.archive import layout
from workers.archive.layout import DayPointer
from workers.config import Settings
from workers.errors import KappaError

log = logging.getLogger("kappa.compaction")

#: Rows per compacted file (~14 bytes/record compressed on event data: ~30-60 MiB files).
DEFAULT_TARGET_ROWS = 2_000_000
#: Replaced files stay readable this long after the switch, for readers that listed before it.
DEFAULT_GRACE_S = 3600.0
#: A day is closed this long after its end, once the archiver has archived everything up to then.
DEFAULT_CLOSE_AFTER_S = 3600.0
#: A "compacting" pointer older than this belongs to a run that died: a new run may take over.
STALE_COMPACTING_S = 900.0

Hook = Callable[[str], None]


@dataclass
class CompactionResult:
    day: str
    compacted: bool
    reason: str
    files_before: int = 0
    files_after: int = 0
    records: int = 0
    digest: str = ""
    swept: int = 0
    sweep_note: str = ""
    generation: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- is the day closed?


def _close_ms(day: str, close_after_s: float) -> int:
    end = dt.datetime.fromisoformat(f"{keys.valid_day(day)}T00:00:00+00:00") + dt.timedelta(days=1)
    return int(end.timestamp() * 1000 + close_after_s * 1000)


def not_closed_reason(settings: Settings, client: Any, topic: str, day: str, close_after_s: float,
                      now_ms: int | None = None) -> str:
    """Why ``day`` may still get files from the archiver ('' when it is closed).

    Closed means: the close time (end of the day + ``close_after_s``) has passed, and on every
    partition of the live topic the archiver's durable checkpoint is past the first record stamped
    at or after the close time (or at the topic's end when there is none yet). Records stamped
    for the day that arrive even later are late files; a compacted day reads them as before.
    """
    close_ms = _close_ms(day, close_after_s)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if now_ms < close_ms:
        closes = dt.datetime.fromtimestamp(close_ms / 1000, dt.UTC).isoformat(timespec="seconds")
        return f"day {day} is not closed until {closes} (end of day + {close_after_s:.0f}s): compact it later"
    if not kafka_helpers.exists(kafka_helpers.admin_client(settings), topic, 30):
        return f"topic {topic!r} does not exist on {settings.bootstrap_servers}: cannot tell whether {day} is closed"
    for partition, needed in sorted(_offsets_at(settings, topic, close_ms).items()):
        body = s3_helpers.get_bytes(client, settings.s3_bucket, keys.archiver_checkpoint(topic, partition))
        archived = -1 if body is None else archiver_checkpoint.from_json(body, topic, partition).next_offset
        if archived < needed:
            return (f"day {day} is not closed: the archiver has archived {topic}[{partition}] up to offset "
                    f"{max(archived, 0)}, the day closes at offset {needed}: wait for the archiver to catch up")
    return ""


def _offsets_at(settings: Settings, topic: str, ts_ms: int) -> dict[int, int]:
    """Per partition: the first offset stamped at or after ``ts_ms``, else the high watermark."""
    ends = kafka_helpers.end_offsets(settings, topic)
    consumer = Consumer(settings.kafka_config(**{"group.id": keys.OFFSETS_PROBE_GROUP, "enable.auto.commit": False}))
    try:
        found = consumer.offsets_for_times([TopicPartition(topic, p, ts_ms) for p in ends], timeout=30)
    finally:
        consumer.close()
    return {tp.partition: tp.offset if tp.offset >= 0 else ends[tp.partition] for tp in found}


# ---------------------------------------------------------------- reading and verifying records


def records_of(client: Any, bucket: str, files: list[dict]) -> pl.DataFrame:
    """The distinct records of these files (each read at its listed ETag), in (partition, offset) order."""
    frames = []
    for f in files:
        try:
            frames.append(archive_format.from_parquet_bytes(s3_helpers.get_if(client, bucket, f["key"], f["etag"])))
        except s3_helpers.Fenced:
            raise KappaError(f"archive object {f['key']} changed during compaction: run it again") from None
    return archive_format.dedup(frames)


def content_digest(frame: pl.DataFrame) -> str:
    """Byte-exact identity of records: sha256 over the per-partition digests, partitions ascending."""
    parts = frame.partition_by("partition", maintain_order=False, as_dict=True)
    return _combine([_partition_digest(parts[key]) for key in sorted(parts)])


def _combine(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _partition_digest(frame: pl.DataFrame) -> str:
    """sha256 over every column of one partition's records in offset order."""
    digest = hashlib.sha256()
    ordered = frame.sort(["partition", "offset"]).select(archive_format.SCHEMA.names())
    for name in ordered.columns:
        column = ordered[name]
        if name == "headers":
            rows = [[(h["key"], h["value"]) for h in row] for row in column.to_list()]
            digest.update(repr(rows).encode())
        else:
            digest.update(repr(column.to_list()).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- the compaction


def _plan(files: list[dict], target_rows: int) -> dict[int, list[dict]]:
    """Per partition, its small files (offset span under ``target_rows``) when there are two or more.

    Files already large (earlier compactions) stay as they are, so a day compacted again after late
    files arrived rewrites only those and the last partial chunk.
    """
    by_partition: dict[int, list[dict]] = defaultdict(list)
    for f in files:
        if int(f["last_offset"]) - int(f["first_offset"]) + 1 < target_rows:
            by_partition[int(f["partition"])].append(f)
    return {p: fs for p, fs in by_partition.items() if len(fs) > 1}


def _chunks(topic: str, day: str, records: pl.DataFrame, target_rows: int) -> list[tuple[str, pl.DataFrame]]:
    """Records of one partition -> (key, frame) files of at most ``target_rows``, archive naming kept."""
    out = []
    for start in range(0, records.height, target_rows):
        chunk = records.slice(start, target_rows)
        partition, first, last = int(chunk["partition"][0]), int(chunk["offset"][0]), int(chunk["offset"][-1])
        out.append((keys.raw_file(topic, day, partition, first, last), chunk))
    return out


def _stands_for(files: list[dict]) -> list[list]:
    """The triples a set of files stands for in the day's fingerprint (a compacted file: what it replaced)."""
    triples: list[list] = []
    for f in files:
        triples += f.get("fingerprint_as") or [[f["key"], int(f["size"]), str(f["etag"])]]
    return triples


def _take_pointer(pointer: DayPointer | None, day: str) -> DayPointer:
    """The pointer this run starts from; refuses while another live run is compacting the day."""
    if pointer is None:
        return DayPointer(state="compacted")
    age_s = time.time() - pointer.started_at_ms / 1000
    if pointer.state == "compacting" and age_s < STALE_COMPACTING_S:
        raise KappaError(f"day {day} is being compacted by {pointer.owner} (started {age_s:.0f}s ago): "
                         f"wait for it, or retry after {STALE_COMPACTING_S:.0f}s if that run died")
    return pointer


def compact_day(
    settings: Settings,
    day: str,
    *,
    client: Any | None = None,
    topic: str | None = None,
    target_rows: int = DEFAULT_TARGET_ROWS,
    grace_s: float = DEFAULT_GRACE_S,
    close_after_s: float = DEFAULT_CLOSE_AFTER_S,
    hook: Hook | None = None,
) -> CompactionResult:
    """Compact one closed day, then sweep files replaced more than ``grace_s`` ago.

    ``hook(step)`` is called after "pending" (pointer names the new keys), "written" (new files in S3,
    verified) and "switched" (pointer names the new set): tests use it to interleave readers.
    """
    if target_rows < 1:
        raise KappaError(f"target rows per compacted file must be >= 1, got {target_rows}")
    client = client or s3_helpers.s3_client(settings)
    topic = settings.events_topic if topic is None else topic
    bucket, hook = settings.s3_bucket, hook or (lambda _step: None)
    keys.valid_day(day)
    reason = not_closed_reason(settings, client, topic, day, close_after_s)
    if reason:
        raise KappaError(reason)
    files, pointer = layout.day_view(client, bucket, topic, day)
    if not files:
        prefix = keys.raw_day_prefix(topic, day)
        raise KappaError(f"no raw archive objects under s3://{bucket}/{prefix}: nothing to compact")
    pointer = _take_pointer(pointer, day)
    plan = _plan(files, target_rows)
    result = CompactionResult(day, False, "no partition has two small files", len(files), len(files),
                              generation=pointer.generation)
    if plan:
        result = _rewrite(client, bucket, topic, day, files, plan, pointer, target_rows, hook)
    swept, note = sweep(client, bucket, topic, day, grace_s)
    result.swept, result.sweep_note = swept, note
    return result


def _rewrite(
    client: Any, bucket: str, topic: str, day: str, files: list[dict], plan: dict[int, list[dict]],
    pointer: DayPointer, target_rows: int, hook: Hook,
) -> CompactionResult:
    """Pending -> write -> verify, one partition at a time (memory: one partition), then one switch."""
    existing = {f["key"] for f in files} | {str(t[0]) for t in pointer.replaced}  # never overwrite a readable file
    pointer.generation += 1
    pointer.state, pointer.owner, pointer.started_at_ms = "compacting", _owner(), int(time.time() * 1000)
    stale = set(pointer.pending)  # a dead or failed run's pending files: hidden until deleted below
    layout.write_pointer(client, bucket, topic, day, pointer)  # fenced: one compaction of a day at a time
    hook("pending")
    old: list[dict] = []
    written: list[dict] = []
    digests: list[str] = []
    records = 0
    try:
        for partition in sorted(plan):
            before = records_of(client, bucket, plan[partition])
            chunks = _chunks(topic, day, before, target_rows)
            if any(key in existing for key, _ in chunks):  # a new name equal to a readable file: leave it
                continue
            pointer.pending += [key for key, _ in chunks if key not in pointer.pending]
            layout.write_pointer(client, bucket, topic, day, pointer)  # named before written
            new = _write_chunks(client, bucket, chunks, _stands_for(plan[partition]))
            digests.append(_verify(day, partition, before, records_of(client, bucket, new)))
            old, written, records = old + plan[partition], written + new, records + before.height
        for key in stale - {f["key"] for f in written}:
            client.delete_object(Bucket=bucket, Key=key)
    except Exception:
        _give_up(client, bucket, topic, day, pointer)
        raise
    if not written:
        pointer.pending = sorted(stale)
        _give_up(client, bucket, topic, day, pointer)
        return CompactionResult(day, False, "compacted names collide with existing files", len(files), len(files))
    hook("written")

    digest = _combine(digests)
    replaced_keys = {f["key"] for f in old}
    pointer.state, pointer.pending, pointer.switched_at_ms = "compacted", [], int(time.time() * 1000)
    pointer.replaced += [[f["key"], int(f["size"]), str(f["etag"])] for f in old]
    pointer.objects = [o for o in pointer.objects if o["key"] not in replaced_keys] + written
    pointer.records, pointer.digest = records, digest
    layout.write_pointer(client, bucket, topic, day, pointer)  # the atomic switch
    hook("switched")
    log.info("compacted %s: %d files -> %d (%d records, digest %s)", day, len(old), len(written), records, digest[:12])
    return CompactionResult(day, True, "compacted", len(files), len(files) - len(old) + len(written),
                            records, digest, generation=pointer.generation)


def _give_up(client: Any, bucket: str, topic: str, day: str, pointer: DayPointer) -> None:
    """Leave the day as it was: the pointer back to "compacted", its pending files still hidden (the next
    run deletes them), so a new run need not wait for this one to look dead."""
    pointer.state = "compacted"
    try:
        layout.write_pointer(client, bucket, topic, day, pointer)
    except Exception as exc:  # S3 gone too: the pointer stays "compacting" and a run takes over later
        log.warning("could not release the compaction pointer of %s: %s", day, exc)


def _write_chunks(client: Any, bucket: str, chunks: list[tuple[str, pl.DataFrame]], stands_for: list) -> list[dict]:
    """Write one partition's pending files; the first remembers the triples of the files they replace."""
    written = []
    for index, (key, chunk) in enumerate(chunks):
        body = archive_format.to_parquet_bytes(chunk)
        etag = client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
        parts = keys.parse_raw_file(key) or {}
        written.append({**parts, "key": key, "size": len(body), "etag": str(etag),
                        "stands_for": stands_for if index == 0 else []})
    return written


def _verify(day: str, partition: int, before: pl.DataFrame, after: pl.DataFrame) -> str:
    """The new files must hold exactly the old records: count, digest and an exact comparison."""
    digest_before, digest_after = _partition_digest(before), _partition_digest(after)
    if before.height != after.height or digest_before != digest_after or not before.equals(after):
        raise KappaError(f"compaction of {day} partition {partition} wrote {after.height} records (digest "
                         f"{digest_after[:12]}) for {before.height} (digest {digest_before[:12]}): not switched, "
                         "the old files stay current")
    return digest_after


# ---------------------------------------------------------------- deleting replaced files


def live_replay_leases(client: Any, bucket: str, topic: str, day: str) -> list[str]:
    """Owners of unexpired replay leases on ``day`` of this archive (any pipeline and version)."""
    from workers.replay.manifest import replay_id  # the slot naming lives with the replay

    day_token = replay_id("x", 1, day, bucket, topic).split("-v1-", 1)[1]
    holders = []
    for obj in s3_helpers.iter_keys(client, bucket, "_state/replays/"):
        slot, _, name = obj["Key"][len("_state/replays/"):].partition("/")
        if name != "lease.json" or not slot.endswith(day_token):
            continue
        body = s3_helpers.get_bytes(client, bucket, obj["Key"])
        doc = json.loads(body) if body else {}
        if float(doc.get("expires", 0)) > time.time():
            holders.append(f"{slot} ({doc.get('owner')})")
    return holders


def sweep(client: Any, bucket: str, topic: str, day: str, grace_s: float) -> tuple[int, str]:
    """Delete files replaced more than ``grace_s`` ago, unless a replay lease holds the day; then drop them
    from the pointer. Returns (deleted, why not everything was deleted)."""
    pointer = layout.read_pointer(client, bucket, topic, day)
    if pointer is None or pointer.state != "compacted" or not pointer.replaced:
        return 0, ""
    age_s = time.time() - pointer.switched_at_ms / 1000
    if age_s < grace_s:
        return 0, f"{len(pointer.replaced)} replaced files kept until the grace period ends ({grace_s - age_s:.0f}s)"
    holders = live_replay_leases(client, bucket, topic, day)
    if holders:
        return 0, f"{len(pointer.replaced)} replaced files kept: replays hold {day}: {', '.join(holders)}"
    gone = []
    for triple in pointer.replaced:
        key, _size, etag = triple
        deleted = s3_helpers.delete_if(client, bucket, key, etag)
        if deleted or s3_helpers.get_stored(client, bucket, key) is None:
            gone.append(triple)
    pointer.replaced = [t for t in pointer.replaced if t not in gone]
    pointer.swept_at_ms = int(time.time() * 1000)
    layout.write_pointer(client, bucket, topic, day, pointer)
    return len(gone), ""
