"""Replay loader: one day of the raw archive -> a fresh replay topic, byte-exact and in event-time order.

Why this shape:

* **Bounded memory.** A day can be far larger than RAM, and archive files are ordered by offset per
  partition, not by timestamp (late events). We therefore do an *external merge sort*: each S3
  object is read alone, sorted by ``(timestamp, partition, offset)`` and spilled to local disk as
  small chunk files (a "sorted run"); then a vectorised k-way merge keeps at most one chunk per
  run in memory and emits, batch by batch, every buffered row whose key is strictly below the
  smallest "last loaded key" of the runs that still have chunks on disk. Memory is
  ``O(files x chunk_rows)`` (``chunk_rows`` shrinks as the file count grows) plus one S3 object.
* **Dedup for free.** Duplicate ``(partition, offset)`` rows (overlapping files after a crash) are
  the same record, so they carry the same sort key and end up adjacent in the merged stream;
  ``unique`` on each emitted batch drops them (the strict bound guarantees both copies are in the
  same batch).
* **Deterministic.** Order is ``(timestamp, original partition, offset)``. By default the replay topic
  mirrors the source partitions (record -> its original partition): per-partition semantics such as
  the pipelines' dedup scope are then exactly those of live, and same key -> same partition holds as
  it did at the source. With an explicit partition count, the replay partition is
  ``crc32(key) % partitions`` (same key -> same partition, in order) and, for null keys,
  ``original partition % partitions``. The same archive always yields the same topic.
* **Idempotent.** A manifest in S3 (``keys.replay_manifest``) records the archive fingerprint and
  the replay topic's end offsets. A re-run skips when the manifest is complete and the topic (or the
  published report) still matches; otherwise the topic and the replay consumer group are deleted and
  recreated, so a partial load can never leave duplicates behind.
* **One owner.** A *slot* is (pipeline, version, day, archive): its manifest lives at
  ``_state/replays/<slot>/manifest.json``. Each load started with a run token (Dagster passes its
  run id) gets its own replay id ``<slot>-<token>``, hence its own topic and group, and a new load
  deletes only the topic and group of the load its manifest replaced. Every manifest write is a
  compare-and-swap on the ETag read (``write_manifest``), so a loader that was paused while another
  run took the slot over can never overwrite the newer manifest; ``workers.replay_lease`` keeps two
  live runs of one slot apart in the first place.
* **Exact snapshot.** The fingerprint is the archive listing with ETags
  (``archive_stats.files_fingerprint``) and every object is read with ``If-Match`` on its listed
  ETag, so a load is of exactly the snapshot its manifest names.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from botocore.exceptions import ClientError
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import NewTopic

from workers import archive_format, archive_stats, keys
from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.errors import KappaError
from workers.perf import gc_paused
from workers.pipelines import get_pipeline

SRC_PARTITION_HEADER = "kappa.src.partition"
SRC_OFFSET_HEADER = "kappa.src.offset"
SORT_KEY = ("_ts", "partition", "offset")
#: Rows kept in memory by the merge, across all runs (``chunk_rows = budget // files``).
DEFAULT_MEMORY_ROWS = 400_000
MIN_CHUNK_ROWS = 500
#: The replay topic holds historical timestamps: time-based retention would delete it at once.
REPLAY_TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1", "message.timestamp.type": "CreateTime"}
PRODUCER_TUNING: dict[str, object] = {
    "enable.idempotence": True,  # ordered, no duplicates on retry
    "acks": "all",
    "linger.ms": 50,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    "delivery.report.only.error": True,  # per-record Python callbacks only when something fails
    # replay what the source topic accepted: librdkafka's 1 MB default refused a 4 MiB archived record
    # at produce time (found by the end-to-end fuzz); the broker still enforces the topic's own limit
    "message.max.bytes": 64 * 1024 * 1024,
}

#: Grace of the bounded processor over a replay topic (see :func:`processor_grace_ms`).
ORDERED_REPLAY_GRACE_MS = 0

ProgressFn = Callable[["Progress"], None]


# ---------------------------------------------------------------- names


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


def replay_topic(source_topic: str, rid: str) -> str:
    return keys.valid_topic(f"{source_topic}.replay.{keys.valid_replay_id(rid)}")


def replay_group(pipeline: str, version: int, rid: str) -> str:
    return f"kappa.{keys.valid_name(pipeline)}.v{keys.valid_version(version)}.replay.{keys.valid_replay_id(rid)}"


@dataclass(frozen=True)
class ReplaySpec:
    """What to replay and how; everything else is derived."""

    pipeline: str
    version: int
    day: str
    source_topic: str
    bucket: str
    partitions: int | None = None  # None: mirror the source topic's partitions
    throttle: float | None = None  # records/s, None = as fast as possible
    #: Unique token of the run that loads (Dagster: its run id): the replay id, topic and group get it,
    #: so two runs never share a topic. None keeps the slot's stable id (the CLI's historical names).
    run: str | None = None

    def __post_init__(self) -> None:
        if self.run is not None and not re.match(RUN_TOKEN_RE, self.run):
            raise KappaError(f"run token {self.run!r} must match {RUN_TOKEN_RE}")
        keys.valid_day(self.day)
        keys.valid_name(self.pipeline)
        keys.valid_version(self.version)
        get_pipeline(self.pipeline, self.version)  # a replay for a version that does not exist is a mistake
        if self.partitions is not None and not 1 <= self.partitions <= 1000:
            raise KappaError(f"replay partitions must be 1..1000, got {self.partitions}")
        if self.throttle is not None and self.throttle <= 0:
            raise KappaError(f"throttle must be a positive number of records/s, got {self.throttle}")

    @property
    def slot(self) -> str:
        return replay_id(self.pipeline, self.version, self.day, self.bucket, self.source_topic)

    @property
    def replay_id(self) -> str:
        return self.slot if self.run is None else keys.valid_replay_id(f"{self.slot}-{self.run}")

    @property
    def topic(self) -> str:
        return replay_topic(self.source_topic, self.replay_id)

    @property
    def group(self) -> str:
        return replay_group(self.pipeline, self.version, self.replay_id)

    @property
    def dlq_topic(self) -> str:
        """Rejects of the replay go here, not to the live DLQ (live already dead-lettered them)."""
        return f"{self.topic}.dlq"

    @property
    def processor_prefix(self) -> str:
        """Where the bounded processor of this replay keeps its checkpoints."""
        return keys.processor_prefix(self.pipeline, self.version, self.group)


@dataclass
class Progress:
    phase: str  # "sort" (reading S3) or "produce"
    done: int
    total: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def describe(self) -> str:
        eta = f"{self.eta_s:.0f}s" if self.eta_s is not None else "?"
        unit = "files" if self.phase == "sort" else "records"
        return f"{self.phase}: {self.done}/{self.total} {unit}, {self.rate:,.0f}/s, eta {eta}"


@dataclass
class LoadResult:
    manifest: dict[str, Any]
    skipped: bool
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- manifest


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


def _offsets_json(offsets: dict[int, int]) -> dict[str, int]:
    return {str(p): int(o) for p, o in sorted(offsets.items())}


# ---------------------------------------------------------------- Kafka topic/group lifecycle


def delete_group(settings: Settings, group: str, timeout: float = 60.0) -> None:
    """Delete a consumer group; waits out a dead member's session (NON_EMPTY_GROUP) up to ``timeout``."""
    admin = kafka_helpers.admin_client(settings)
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.delete_consumer_groups([group], request_timeout=30)[group].result()
            return
        except KafkaException as exc:
            code = exc.args[0].code()
            if code == KafkaError.GROUP_ID_NOT_FOUND:
                return
            if code != KafkaError.NON_EMPTY_GROUP or time.monotonic() > deadline:
                raise KappaError(f"could not delete consumer group {group}: {exc.args[0].str()}") from None
        time.sleep(2)


def recreate_topic(settings: Settings, topic: str, partitions: int, timeout: float = 90.0) -> None:
    """Delete ``topic`` if present, then create it empty (retrying while Kafka finishes the delete)."""
    admin = kafka_helpers.admin_client(settings)
    kafka_helpers.delete_topics(settings, [topic])
    deadline = time.monotonic() + timeout
    replication = settings.topic_replication
    while True:
        if topic not in admin.list_topics(timeout=30).topics:
            new = NewTopic(topic, num_partitions=partitions, replication_factor=replication, config=REPLAY_TOPIC_CONFIG)
            try:
                admin.create_topics([new], operation_timeout=30, request_timeout=30)[topic].result()
                return
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        if time.monotonic() > deadline:
            raise KappaError(f"topic {topic} is still being deleted after {timeout:.0f}s")
        time.sleep(0.5)


def topic_end_offsets(settings: Settings, topic: str) -> dict[str, int] | None:
    """End offsets as stored in the manifest, or None when the topic does not exist."""
    if topic not in kafka_helpers.admin_client(settings).list_topics(timeout=30).topics:
        return None
    return _offsets_json(kafka_helpers.end_offsets(settings, topic))


def delete_prefix(client: Any, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix`` (1000 per request); returns how many."""
    keys_ = [obj["Key"] for obj in s3_helpers.iter_keys(client, bucket, prefix)]
    for start in range(0, len(keys_), 1000):
        batch = [{"Key": key} for key in keys_[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys_)


def reset_consumer_side(settings: Settings, client: Any, manifest: dict[str, Any]) -> None:
    """Forget everything a consumer derived from a previous load: group, processor checkpoints, DLQ."""
    delete_group(settings, manifest["group"])
    delete_shuffle_internals(settings, manifest["group"])
    delete_prefix(client, settings.s3_bucket, manifest["processor_prefix"])
    kafka_helpers.delete_topics(settings, [manifest["dlq_topic"]])


def delete_shuffle_internals(settings: Settings, group: str) -> None:
    """A pipeline with a state key also left a repartition topic and a stage-2 group (workers/shuffle.py)."""
    from workers import shuffle  # imported here: the shuffle reads this module's header names

    shuffle.delete_internal(settings, group, delete_group)


def cleanup(settings: Settings, manifest: dict[str, Any], client: Any | None = None) -> None:
    """Delete the replay topic, its DLQ, consumer group and processor checkpoints (the report is in S3)."""
    client = client or s3_helpers.s3_client(settings)
    kafka_helpers.delete_topics(settings, [manifest["replay_topic"]])
    reset_consumer_side(settings, client, manifest)


def source_partitions(settings: Settings, source_topic: str, files: list[dict]) -> int:
    """Partition count of the source: the live topic's if it exists, at least what the archive holds."""
    archived = max(int(f["partition"]) for f in files) + 1
    if source_topic in kafka_helpers.admin_client(settings).list_topics(timeout=30).topics:
        return max(archived, kafka_helpers.partition_count(settings, source_topic))
    return archived


# ---------------------------------------------------------------- external sort: runs


class SortedRun:
    """One archive object, sorted and spilled to disk as chunk files; at most one chunk in memory."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = deque(paths)
        self.buffer = pl.DataFrame()

    @property
    def pending(self) -> bool:
        """True while chunks remain on disk."""
        return bool(self.paths)

    def fill(self) -> None:
        """Ensure the buffer is non-empty while chunks remain."""
        while self.buffer.is_empty() and self.paths:
            self.load_next()

    def load_next(self) -> None:
        chunk = pl.read_ipc(self.paths.popleft())
        self.buffer = chunk if self.buffer.is_empty() else pl.concat([self.buffer, chunk])

    def last_key(self) -> tuple[int, int, int]:
        row = self.buffer.select(SORT_KEY).row(-1)
        return (row[0], row[1], row[2])

    def take_below(self, bound: tuple[int, int, int] | None) -> pl.DataFrame:
        """Remove and return buffered rows with key < ``bound`` (all rows when bound is None)."""
        if bound is None:
            taken, self.buffer = self.buffer, pl.DataFrame()
            return taken
        below = _key_below(bound)
        taken = self.buffer.filter(below)
        self.buffer = self.buffer.filter(~below)
        return taken


def _key_below(bound: tuple[int, int, int]) -> pl.Expr:
    ts, part, off = bound
    same_ts = pl.col("_ts") == ts
    same_partition = pl.col("partition") == part
    return (
        (pl.col("_ts") < ts)
        | (same_ts & (pl.col("partition") < part))
        | (same_ts & same_partition & (pl.col("offset") < off))
    )


def spill_sorted(frame: pl.DataFrame, directory: Path, name: str, chunk_rows: int) -> list[Path]:
    """Sort one archive frame by the replay order and write it as IPC chunks."""
    frame = frame.with_columns(pl.col("timestamp").dt.epoch("ms").alias("_ts")).sort(list(SORT_KEY))
    paths = []
    for index, start in enumerate(range(0, frame.height, chunk_rows)):
        path = directory / f"{name}-{index:06d}.arrow"
        frame.slice(start, chunk_rows).write_ipc(path, compression="lz4")
        paths.append(path)
    return paths


def merge_runs(runs: list[SortedRun]) -> Iterator[pl.DataFrame]:
    """k-way merge of sorted runs in vectorised batches, duplicates removed."""
    while True:
        for run in runs:
            run.fill()
        pending = [run for run in runs if run.pending]
        bound = min(run.last_key() for run in pending) if pending else None
        parts = [run.take_below(bound) for run in runs if not run.buffer.is_empty()]
        parts = [part for part in parts if not part.is_empty()]
        if parts:
            batch = pl.concat(parts).sort(list(SORT_KEY))
            yield batch.unique(subset=["partition", "offset"], keep="first", maintain_order=True)
        if bound is None:
            return
        for run in pending:
            if run.last_key() == bound:
                run.load_next()


# ---------------------------------------------------------------- produce


def target_partition(key: bytes | None, source_partition: int, partitions: int | None) -> int:
    """Source mode (``partitions`` None): the original partition. Key mode: crc32(key) % partitions."""
    if partitions is None:
        return source_partition
    if key is None:
        return source_partition % partitions
    return zlib.crc32(key) % partitions


def row_headers(frame: pl.DataFrame) -> list[list[tuple[str, bytes | None]]]:
    """Per row: the original headers (order and bytes kept), then the ``kappa.src.*`` headers.

    The source partition/offset values are built as a column; only rows that carry original headers
    (usually a minority) go through a per-header Python step.
    """
    src = frame.select(
        pl.col("partition").cast(pl.String).cast(pl.Binary).alias("p"),
        pl.col("offset").cast(pl.String).cast(pl.Binary).alias("o"),
    )
    headers = [
        [(SRC_PARTITION_HEADER, p), (SRC_OFFSET_HEADER, o)]
        for p, o in zip(src["p"].to_list(), src["o"].to_list(), strict=True)
    ]
    flat = (
        frame.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), "headers")
        .filter(pl.col("headers").list.len() > 0)
        .explode("headers")
        .unnest("headers")
    )
    if flat.height:
        originals: dict[int, list[tuple[str, bytes | None]]] = {}
        columns = (flat["_row"].to_list(), flat["key"].to_list(), flat["value"].to_list())
        for row, name, value in zip(*columns, strict=True):
            originals.setdefault(row, []).append((name, value))
        for row, original in originals.items():
            headers[row] = original + headers[row]
    return headers


class ReplayProducer:
    """Produces merged batches byte-exact with source headers; fails on the first delivery error."""

    def __init__(self, settings: Settings, topic: str, partitions: int | None, throttle: float | None) -> None:
        self.topic = topic
        self.partitions = partitions
        self.throttle = throttle
        self.errors: list[str] = []
        self.produced = 0
        self.started = time.monotonic()
        self.producer = Producer(settings.kafka_config(**PRODUCER_TUNING, on_delivery=self._on_delivery))

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None and len(self.errors) < 10:
            self.errors.append(err.str())

    def _raise_if_failed(self) -> None:
        if self.errors:
            raise KappaError(f"replay produce to {self.topic} failed: {'; '.join(self.errors)}")

    def produce_frame(self, frame: pl.DataFrame) -> None:
        step = max(1, int(self.throttle / 10)) if self.throttle else frame.height
        for start in range(0, frame.height, step):
            self._produce_rows(frame.slice(start, step))
            self._throttle()
        self._raise_if_failed()

    def _produce_rows(self, frame: pl.DataFrame) -> None:
        """One ``produce()`` per row; everything else (target partitions, header values) is vectorised."""
        keys_, values, stamps = frame["key"].to_list(), frame["value"].to_list(), frame["_ts"].to_list()
        targets = self._targets(frame).to_list()
        produce, topic = self.producer.produce, self.topic
        for key, value, ts, target, headers in zip(keys_, values, stamps, targets, row_headers(frame), strict=True):
            try:
                produce(topic, value=value, key=key, headers=headers, timestamp=ts, partition=target)
            except BufferError:
                while True:
                    self.producer.poll(0.05)
                    try:
                        produce(topic, value=value, key=key, headers=headers, timestamp=ts, partition=target)
                        break
                    except BufferError:
                        continue
        self.producer.poll(0)
        self.produced += frame.height

    def _targets(self, frame: pl.DataFrame) -> pl.Series:
        """:func:`target_partition` of every row, with one crc32 per distinct key (not per row)."""
        if self.partitions is None:
            return frame["partition"]
        distinct = frame["key"].drop_nulls().unique()
        lookup = pl.DataFrame(
            {"key": distinct, "_target": [zlib.crc32(k) % self.partitions for k in distinct.to_list()]},
            schema={"key": pl.Binary, "_target": pl.Int64},
        )
        joined = frame.select("key", "partition").join(lookup, on="key", how="left", maintain_order="left")
        return joined.select(pl.coalesce("_target", pl.col("partition").cast(pl.Int64) % self.partitions))[
            "_target"
        ]

    def _throttle(self) -> None:
        if self.throttle:
            ahead = self.produced / self.throttle - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        remaining = self.producer.flush(120)
        if remaining:
            self.errors.append(f"{remaining} records not delivered within 120s")
        self._raise_if_failed()


# ---------------------------------------------------------------- the load


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


def archive_fingerprint(files: list[dict]) -> str:
    """The raw archive's data version of these objects (``archive_stats.day_fingerprint``: keys, sizes, ETags)."""
    return archive_stats.files_fingerprint(files)


def is_up_to_date(settings: Settings, client: Any, manifest: dict[str, Any] | None, spec: ReplaySpec, fp: str) -> str:
    """Why the previous load can be reused ('' when it cannot)."""
    if not manifest or manifest.get("source_fingerprint") != fp:
        return ""
    if manifest.get("partitions_requested") != spec.partitions:
        return ""
    if published(client, spec.bucket, manifest):
        return "the checked report of this exact archive is already published"
    status = manifest.get("status")
    if status in LOADED_STATES and topic_end_offsets(settings, manifest["replay_topic"]) == manifest["end_offsets"]:
        return "the replay topic already holds this exact archive"
    return ""


def base_manifest(spec: ReplaySpec, files: list[dict], fp: str) -> dict[str, Any]:
    return {
        "slot": spec.slot,
        "replay_id": spec.replay_id,
        "pipeline": spec.pipeline,
        "version": spec.version,
        "day": spec.day,
        "source_topic": spec.source_topic,
        "replay_topic": spec.topic,
        "group": spec.group,
        "partitions_requested": spec.partitions,
        "partitioning": "source" if spec.partitions is None else "key",
        "dlq_topic": spec.dlq_topic,
        "processor_prefix": spec.processor_prefix,
        "report_key": keys.report_file(spec.pipeline, spec.version, spec.day),
        "source_fingerprint": fp,
        # provenance: the data version of raw_archive[day] this replay (and its report) was computed from
        "archive_fingerprint": fp,
        # every replay partition is in (timestamp, partition, offset) order: see processor_grace_ms
        "event_time_ordered": True,
        "source_files": len(files),
        # the exact snapshot (what the fingerprint digests): the gate's reference reads these versions
        "source_objects": [[f["key"], int(f["size"]), f["etag"]] for f in files],
        "source_bytes": sum(int(f["size"]) for f in files),
        "status": "loading",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _supersede(settings: Settings, client: Any, previous: dict[str, Any] | None, manifest: dict[str, Any]) -> None:
    """Delete the topic and group of the load this manifest replaced (never any other run's).

    Called only after the new manifest won its conditional write, so the previous load has no owner
    left: its run finished, failed, or lost the lease (and is fenced from writing).
    """
    if previous is None or previous.get("cleaned") or previous.get("replay_topic") == manifest["replay_topic"]:
        return
    try:
        cleanup(settings, previous, client)
    except KappaError as exc:  # e.g. a zombie member still in the old group: leave it, say so
        manifest.setdefault("superseded_not_cleaned", []).append(f"{previous.get('replay_id')}: {exc}")


def _abandon(settings: Settings, client: Any, manifest: dict[str, Any]) -> None:
    """A load that lost its slot deletes its own topic (only that) so nothing is left behind."""
    with contextlib.suppress(Exception):
        kafka_helpers.delete_topics(settings, [manifest["replay_topic"]])


def load(
    settings: Settings,
    spec: ReplaySpec,
    *,
    client: Any | None = None,
    progress: ProgressFn | None = None,
    progress_interval: float = 2.0,
    force: bool = False,
    memory_rows: int = DEFAULT_MEMORY_ROWS,
    lost: threading.Event | None = None,
) -> LoadResult:
    """Load one day into its replay topic (or reuse an identical previous load) and return the manifest.

    ``lost`` (the run's lease) set means another run took the slot over: stop, delete our topic.
    """
    client = client or s3_helpers.s3_client(settings)
    files = archive_format.day_files(client, spec.bucket, spec.source_topic, spec.day)
    if not files:
        prefix = keys.raw_day_prefix(spec.source_topic, spec.day)
        raise KappaError(f"no raw archive objects under s3://{spec.bucket}/{prefix}: nothing to replay for {spec.day}")
    fp = archive_fingerprint(files)
    previous = read_manifest(client, spec.bucket, spec.slot)
    reason = "" if force else is_up_to_date(settings, client, previous, spec, fp)
    if reason and previous is not None:
        return LoadResult(previous, skipped=True, reason=reason)

    manifest = base_manifest(spec, files, fp)
    manifest[ETAG] = previous.get(ETAG) if previous else None
    partitions = spec.partitions or source_partitions(settings, spec.source_topic, files)
    manifest["partitions"] = partitions
    write_manifest(client, spec.bucket, manifest)  # fenced: only one run can replace `previous`
    _supersede(settings, client, previous, manifest)
    reset_consumer_side(settings, client, manifest)
    recreate_topic(settings, spec.topic, partitions)
    reporter = _Reporter(progress, progress_interval, lost)
    try:
        with tempfile.TemporaryDirectory(prefix=f"replay-{spec.replay_id}-") as tmp:
            runs, stats = _sort_files(client, spec.bucket, files, Path(tmp), memory_rows, reporter)
            produced = _produce_all(settings, spec, runs, stats["rows_read"], reporter)
        end = topic_end_offsets(settings, spec.topic) or {}
        if sum(end.values()) != produced:
            raise KappaError(f"replay topic {spec.topic} holds {sum(end.values())} records, expected {produced}")
        manifest.update(
            status="loaded",
            records=produced,
            rows_read=stats["rows_read"],
            duplicates_dropped=stats["rows_read"] - produced,
            end_offsets=end,
            source_end_offsets=_offsets_json(stats["source_end"]),
            loaded_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            load_seconds=round(reporter.elapsed(), 3),
        )
        write_manifest(client, spec.bucket, manifest)
    except ManifestFenced:
        _abandon(settings, client, manifest)
        raise
    return LoadResult(manifest, skipped=False, reason="loaded")


class _Reporter:
    """Rate-limited progress callbacks."""

    def __init__(self, callback: ProgressFn | None, interval: float, lost: threading.Event | None = None) -> None:
        self.callback = callback
        self.interval = interval
        self.lost = lost
        self.started = time.monotonic()
        self.phase_started = self.started
        self.last = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def phase(self) -> None:
        self.phase_started = time.monotonic()
        self.last = 0.0

    def __call__(self, phase: str, done: int, total: int, final: bool = False) -> None:
        if self.lost is not None and self.lost.is_set():
            raise ManifestFenced(f"the lease of this replay was taken over by another run during {phase}: stopping")
        now = time.monotonic()
        if self.callback and (final or now - self.last >= self.interval):
            self.last = now
            self.callback(Progress(phase, done, total, now - self.phase_started))


def _sort_files(
    client: Any, bucket: str, files: list[dict], directory: Path, memory_rows: int, reporter: _Reporter
) -> tuple[list[SortedRun], dict[str, Any]]:
    """Phase 1: each S3 object alone -> a sorted run on local disk."""
    chunk_rows = max(MIN_CHUNK_ROWS, memory_rows // len(files))
    runs, rows_read, source_end = [], 0, {}
    for index, file in enumerate(files):
        body = _read_listed(client, bucket, file)
        frame = archive_format.from_parquet_bytes(body)
        del body
        rows_read += frame.height
        for partition, last in frame.group_by("partition").agg(pl.col("offset").max()).iter_rows():
            source_end[partition] = max(source_end.get(partition, 0), last + 1)
        runs.append(SortedRun(spill_sorted(frame, directory, f"{index:06d}", chunk_rows)))
        reporter("sort", index + 1, len(files), final=index + 1 == len(files))
    return runs, {"rows_read": rows_read, "source_end": source_end}


def _read_listed(client: Any, bucket: str, file: dict) -> bytes:
    """The object at the version the listing (and so the fingerprint) saw, or a clear error."""
    try:
        return s3_helpers.get_if(client, bucket, file["key"], file["etag"])
    except s3_helpers.Fenced:
        raise KappaError(f"archive object {file['key']} changed during the load: run it again") from None


def _produce_all(settings: Settings, spec: ReplaySpec, runs: list[SortedRun], total: int, reporter: _Reporter) -> int:
    """Phase 2: merge the runs and produce; every record acknowledged or the load fails."""
    producer = ReplayProducer(settings, spec.topic, spec.partitions, spec.throttle)
    reporter.phase()
    with gc_paused():
        for batch in merge_runs(runs):
            producer.produce_frame(batch)
            reporter("produce", producer.produced, total)
    producer.close()
    reporter("produce", producer.produced, producer.produced, final=True)
    return producer.produced
