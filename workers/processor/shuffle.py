"""Keyed state across partitions: the two-stage topology of a pipeline with a state key.

Copies of one event arrive through any partition, so state keyed by anything but the input's key
goes through a repartition topic, one Kafka transaction per stage-1 batch (docs/ARCHITECTURE.md,
"Keyed state across partitions").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import polars as pl
from botocore.exceptions import ClientError
from confluent_kafka import OFFSET_BEGINNING, OFFSET_STORED, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as TP

from workers import kafka as kafka_helpers
from workers import keys, membership
from workers.config import Settings
from workers.errors import KappaError
from workers.kafka import Stopped, retrying
from workers.pipelines.base import REJECT, WINDOW_MS, Pipeline
from workers.processor.engine import (
    ALWAYS,
    CHECKPOINT_FLUSH_S,
    DLQ_PRODUCER_CONFIG,
    Processor,
    RunSummary,
    day_counts,
    late_headers,
    split_batch,
)
from workers.processor.handoff import claim_live_prefix
from workers.processor.progress import NoProgress, Progress
from workers.processor.state import PartitionState, StateStore, day_of
from workers.replay.producer import SRC_OFFSET_HEADER, SRC_PARTITION_HEADER
from workers.s3 import ensure_bucket, get_bytes, s3_client

log = logging.getLogger("kappa.shuffle")

Stage = Literal["both", "1", "2"]
SHUFFLE_HEADER = "kappa.shuffle"
STAGE1_JOIN_TIMEOUT_S = 180.0
DATA, PROGRESS = b"data", b"progress"
SRC_PARTITION, SRC_OFFSET = "src_partition", "src_offset"
#: what stage 2 needs to send a late record byte-exact, as single-stage does: the record as read and
#: its position in stage 1's input; shipped only when windows can close (a finite grace)
RAW_KEY, RAW_VALUE, RAW_HEADERS, IN_PARTITION, IN_OFFSET = "_raw_key", "_raw_value", "_raw_headers", "_in_p", "_in_o"
RAW_COLUMNS = (RAW_KEY, RAW_VALUE, RAW_HEADERS, IN_PARTITION, IN_OFFSET)
SOURCE_HEADERS = (SRC_PARTITION_HEADER, SRC_OFFSET_HEADER)
NO_SOURCE = ((None, None), (None, None))
MISSING_HEADER = ("kappa.late.missing", b"not shipped through the shuffle: stage 1 ran without a grace")
#: a record's headers travel as one msgpack blob: a polars list of structs per row cost more than the rest of stage 1
HEADERS_ENCODER, HEADERS_DECODER = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[tuple[str, bytes | None]])
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: no time/size retention: stage 2 may be down for long, and event times are historical in replays
INTERNAL_TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1", "max.message.bytes": str(MAX_MESSAGE_BYTES)}
#: both stages' consumer prefetch (benchmarks/README.md, "The live processor's memory, first round")
SHUFFLE_PREFETCH = {"max.partition.fetch.bytes": 2 * 1024 * 1024, "queued.max.messages.kbytes": 16 * 1024}
#: stage 1 pauses a source partition that runs this many records ahead of its slowest active one
#: in event time (``Stage1.align``), and resumes it once it is half as far ahead. Counted in records,
#: not time: what stage 2 holds open is records. A bound far below one fetch of a partition pauses
#: after every fetch and stalls the run (10 minutes, ~1.2k records at 1M events a day: 150k -> 65k
#: rec/s); 20k kept the live peak at 530 / 561 MiB for 1M / 10M events a day, 156k / 299k rec/s.
ALIGN_RECORDS = 20_000
#: stage 1 commits its transaction at least this often (stage 2 only sees committed data)
STAGE1_COMMIT_SECONDS = 1.0
#: a killed stage 1 with a random transactional.id holds stage 2 (read_committed) until this expires
TRANSACTION_TIMEOUT_MS = 10_000
#: librdkafka's own timeout for one transactional call, and how long one is retried before the
#: transaction is aborted and redone: a transaction still open past ``TRANSACTION_TIMEOUT_MS`` has
#: been aborted by the broker, so waiting or retrying longer gains nothing
CALL_TIMEOUT_S = TRANSACTION_RETRY_S = TRANSACTION_TIMEOUT_MS / 1000
#: a transactional call that has not returned by then is stuck: after a broker restart librdkafka
#: can ignore its own timeout (see ``call_within``). At 45 s, every broker restart that fenced a
#: static stage 1 stalled the shuffle for 45 s (the broker-restart suite, every run)
CALL_LIMIT_S = 2 * CALL_TIMEOUT_S
#: an abort first waits for the transaction's outstanding deliveries (a broker refusing them keeps
#: them in flight for a while): it keeps the longer bounds it always had
ABORT_TIMEOUT_S, ABORT_LIMIT_S = 30.0, 45.0
#: a committed-offsets query: one try's timeout (a timed-out try is not repeated: stage 1 rejoins with
#: new clients), and how long other transient errors (a coordinator moving or loading) are retried
COMMITTED_TIMEOUT_S = 15.0
COMMITTED_RETRY_S = 40.0
#: one ``init_transactions`` try (timed-out tries are retried): short, so a stop is seen between tries
INIT_TRY_S = 10.0
INSTANCE_ENV = "KAPPA_INSTANCE_ID"
#: a reset of the internals takes seconds; a lock this old was left by a member that died meanwhile
RESET_LOCK_SECONDS = 180.0


# ---------------------------------------------------------------- names and internal topics


def internal_topics(settings: Settings, group: str) -> list[str]:
    """Every repartition topic of ``group`` that exists on the cluster."""
    listed = kafka_helpers.admin_client(settings).list_topics(timeout=30).topics
    return sorted(t for t in listed if keys.is_repartition_topic(t, group))


def delete_internal(settings: Settings, group: str) -> None:
    """Remove what the shuffle of ``group`` created: its repartition topics and the stage-2 group."""
    kafka_helpers.delete_topics(settings, internal_topics(settings, group))
    kafka_helpers.delete_group(settings, keys.shuffle_group(group))


def ensure_repartition_topic(settings: Settings, topic: str, partitions: int) -> int:
    """Create the internal topic with an explicit partition count; an existing one keeps its count
    (stage-2 state is per repartition partition, so the count never changes under a running group)."""
    kafka_helpers.ensure_topic(settings, topic, partitions, INTERNAL_TOPIC_CONFIG)
    existing = kafka_helpers.partition_count(settings, topic)
    if existing != partitions:
        log.warning("%s exists with %d partitions (asked %d): keeping %d", topic, existing, partitions, existing)
    return existing


def prepare_internals(settings: Settings, stage: Stage, prefix: str, names: Mapping[str, str], partitions: int,
                      stop: threading.Event) -> int:
    """Bind the Kafka-side state (stage-1 offsets, repartition topic, stage-2 group) to the S3 prefix.

    Stage 2 trusts what the repartition topic holds, so internals left by an earlier incarnation of
    the group (its S3 state deleted, e.g. a fresh bucket) must go first. While the prefix has no
    ``shuffle.json``, one stage-1 member (the one whose create-only PUT of a reset lock succeeds)
    removes them and writes the marker; every other member waits for the marker before it joins a
    group. Returns the repartition topic's partition count.
    """
    client = s3_client(settings)
    bucket = settings.s3_bucket
    ensure_bucket(client, bucket)
    marker, lock = f"{prefix}_state/shuffle.json", f"{prefix}_state/shuffle.reset"
    while (data := get_bytes(client, bucket, marker)) is None:
        if stage != "2" and claim(client, bucket, lock):
            try:
                # re-read under the lock: another member may have set up and released it since our read
                if (data := get_bytes(client, bucket, marker)) is None:
                    reset_internals(settings, names, partitions)
                    body = json.dumps({**names, "partitions": partitions}).encode()
                    client.put_object(Bucket=bucket, Key=marker, Body=body, ContentType="application/json")
            finally:
                client.delete_object(Bucket=bucket, Key=lock)
            break
        if stop.is_set():
            raise KappaError(f"stopped while waiting for s3://{bucket}/{marker} (another member sets up the shuffle)")
        drop_stale_lock(client, bucket, lock)
        time.sleep(0.5)
    if data is not None and json.loads(data)["topic"] != names["topic"]:
        raise KappaError(f"group {names['group']} shuffles topic {json.loads(data)['topic']!r}, "
                         f"not {names['topic']!r}; use a new --group")
    return ensure_repartition_topic(settings, names["repartition"], partitions)


def reset_internals(settings: Settings, names: Mapping[str, str], partitions: int) -> None:

    kafka_helpers.delete_group(settings, names["group"])
    delete_internal(settings, names["group"])
    ensure_repartition_topic(settings, names["repartition"], partitions)


def claim(client: Any, bucket: str, key: str) -> bool:
    """Create-only PUT (``If-None-Match: *``): True for the one caller that created ``key``."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"PreconditionFailed", "ConditionalRequestConflict"}:
            return False
        raise


def drop_stale_lock(client: Any, bucket: str, key: str, seconds: float = RESET_LOCK_SECONDS) -> None:
    """A reset lock older than ``seconds`` belongs to a member that died mid-reset: free it."""
    with contextlib.suppress(ClientError):
        modified = client.head_object(Bucket=bucket, Key=key)["LastModified"]
        if (dt.datetime.now(dt.UTC) - modified).total_seconds() > seconds:
            client.delete_object(Bucket=bucket, Key=key)


def check_state_key(pipeline: Pipeline) -> None:
    """Copies that dedup together must meet in one repartition partition: state_key within dedup_by."""
    if not set(pipeline.state_key) <= set(pipeline.dedup_by):
        raise KappaError(f"{pipeline.label}: state_key {pipeline.state_key} must be in dedup_by {pipeline.dedup_by}")


# ---------------------------------------------------------------- wire format


def encode_frame(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc_stream(buffer, compression="uncompressed")  # the producer compresses the batch (lz4)
    return buffer.getvalue()


def decode_frame(value: bytes) -> pl.DataFrame:
    return pl.read_ipc_stream(io.BytesIO(value))


def target_partitions(frame: pl.DataFrame, state_key: Sequence[str], partitions: int) -> pl.Series:
    """crc32 of the state key (stable across processes and versions, unlike polars' hash) % R;
    rows without a key (malformed) stay with their source partition."""
    joined = frame.select(pl.concat_str([pl.col(c).cast(pl.String) for c in state_key], separator="\x1f"))
    hashed = [None if k is None else zlib.crc32(k.encode()) % partitions for k in joined.to_series().to_list()]
    by_key = pl.Series("_target", hashed, dtype=pl.Int64)
    return pl.select(pl.coalesce(by_key, frame[SRC_PARTITION].cast(pl.Int64) % partitions)).to_series()


def with_raw(frame: pl.DataFrame, messages: list[Any], headers: list[Any]) -> pl.DataFrame:
    """The records' key, value, headers (one msgpack blob per record) and input position as columns,
    for stage 2's late topic; ``messages`` and ``headers`` line up with the frame's rows."""
    encode = HEADERS_ENCODER.encode
    return frame.with_columns(
        pl.Series(RAW_KEY, [m.key() for m in messages], dtype=pl.Binary),
        pl.Series(RAW_VALUE, [m.value() for m in messages], dtype=pl.Binary),
        pl.Series(RAW_HEADERS, [None if h is None else encode(h) for h in headers], dtype=pl.Binary),
        pl.col("partition").alias(IN_PARTITION),
        pl.col("offset").alias(IN_OFFSET),
    )


def with_archive_source(frame: pl.DataFrame, headers: list[Any]) -> pl.DataFrame:
    """Source coordinates: the archive's, from the two ``kappa.src.*`` headers the replay loader
    appends last (``replay_producer.row_headers``), else the record's own position."""
    tails = [h[-2:] if h and len(h) >= 2 else NO_SOURCE for h in headers]
    replayed = [(p[1], o[1]) if (p[0], o[0]) == SOURCE_HEADERS else (None, None) for p, o in tails]
    source = pl.DataFrame(replayed, schema={"_p": pl.Binary, "_o": pl.Binary}, orient="row").select(
        pl.all().cast(pl.String).cast(pl.Int64)
    )
    return frame.with_columns(
        source["_p"].fill_null(frame["partition"]).cast(pl.Int32).alias(SRC_PARTITION),
        source["_o"].fill_null(frame["offset"]).alias(SRC_OFFSET),
    )


def raw_headers(shipped: bytes | list[dict[str, Any]] | None) -> list[tuple[str, bytes | None]]:
    """A record's headers as shipped by :func:`with_raw`, or as an earlier release shipped them (a list
    of ``{name, value}`` structs: a repartition topic may still hold those after an upgrade)."""
    if shipped is None:
        return []
    if isinstance(shipped, bytes):
        return HEADERS_DECODER.decode(shipped)
    return [(h["name"], h["value"]) for h in shipped]


@dataclass
class SourceProgress:
    """Stage 1's progress on one source partition, as sent to stage 2."""

    max_ts: int | None = None
    idle: bool = False
    ended: bool = False

    def as_list(self) -> list[Any]:
        return [self.max_ts, self.idle, self.ended]


# ---------------------------------------------------------------- stage 2 state


@dataclass
class ShuffleState(PartitionState):
    """A repartition partition's state: ``windows`` holds per open window the winning copy per
    (window, dedup_by) (``seen`` is their checkpointed form), ``max_ts`` the watermark before grace
    (min over sources, monotonic). Per-window frames keep a batch's work proportional to the windows
    it touches, not to the whole state (a bounded run with infinite grace holds the whole day)."""

    sources: dict[int, SourceProgress] = field(default_factory=dict)
    n_sources: int | None = None
    windows: dict[int, pl.DataFrame] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seen.width == 0:
            self.seen = winners_schema(self.pipeline).to_frame()
        super().__post_init__()

    def split_seen(self) -> None:
        """After a load: the checkpointed winners back into per-window frames."""
        self.windows = {w: f for (w,), f in self.seen.partition_by(WINDOW_MS, as_dict=True).items()}  # type: ignore[misc]

    def close_windows(self, watermark: int | None) -> int:
        """Aggregate the winners of windows ending at or before ``watermark`` into ``pending``."""
        if watermark is None:
            return 0
        closing = [w for w in self.windows if w + self.pipeline.window_ms <= watermark]
        if closing:
            closed = pl.concat([self.windows.pop(w) for w in sorted(closing)])
            self.pending = pl.concat([self.pending, aggregate_winners(self.pipeline, closed)])
            self.dirty = True
        return len(closing)

    def refresh_open(self) -> None:
        """Winners and open-window partials as checkpointed (and read as provisional results)."""
        schema = winners_schema(self.pipeline)
        self.seen = pl.concat([schema.to_frame(), *self.windows.values()])
        self.open = aggregate_winners(self.pipeline, self.seen)

    def floor(self) -> int | None:
        """Min max-event-time over the active sources; None until every source reported once."""
        if self.n_sources is None:
            return None
        active, known = [], []
        for partition in range(self.n_sources):
            source = self.sources.get(partition)
            if source is None:
                return None
            if source.max_ts is not None:
                known.append(source.max_ts)
            if source.idle or source.ended:
                continue
            if source.max_ts is None:
                return None
            active.append(source.max_ts)
        if active:
            return min(active)
        return max(known) if known else None

    def all_ended(self) -> bool:
        return self.n_sources is not None and all(
            self.sources.get(p, SourceProgress()).ended for p in range(self.n_sources)
        )

    def to_json(self) -> dict[str, Any]:
        progress = {str(p): s.as_list() for p, s in sorted(self.sources.items())}
        return {**super().to_json(), "shuffle": {"sources": self.n_sources, "progress": progress}}


def winners_schema(pipeline: Pipeline) -> pl.Schema:
    fields = pipeline.parse([]).drop(REJECT).schema
    return pl.Schema(
        {WINDOW_MS: pl.Int64, **fields, "timestamp_ms": pl.Int64, SRC_PARTITION: pl.Int32, SRC_OFFSET: pl.Int64}
    )


def aggregate_winners(pipeline: Pipeline, winners: pl.DataFrame) -> pl.DataFrame:
    if winners.height == 0:
        return pipeline.empty_partials()
    rows = winners.with_columns(pl.col(WINDOW_MS).cast(pl.Datetime("ms", "UTC")).alias("window_start"))
    return pipeline.aggregate(rows)


class ShuffleStore(StateStore):
    """The processor's state store; also restores the per-source progress of a :class:`ShuffleState`."""

    def load(self, state: PartitionState) -> PartitionState:
        state = super().load(state)
        doc = self.read_json(state.partition)
        if doc is not None and isinstance(state, ShuffleState) and doc.get("shuffle"):
            state.n_sources = doc["shuffle"]["sources"]
            state.sources = {int(p): SourceProgress(*v) for p, v in doc["shuffle"]["progress"].items()}
        if isinstance(state, ShuffleState):
            state.split_seen()
        return state


def apply_rows(rows: pl.DataFrame, state: ShuffleState) -> pl.DataFrame:
    """Fold shuffled rows into the winners of their windows; returns them with their ``outcome``.

    dlq: rejected by stage 1; late: window ended at or before the watermark; duplicates: a copy of
    a (window, dedup_by) already seen (here or earlier); counted: the first copy seen. Counts do
    not depend on order; which copy is kept (smallest timestamp, source partition, source offset)
    is decided among all copies seen while the window is open.
    """
    pipeline = state.pipeline
    rows = pipeline.with_window(rows).with_row_index("_row")
    watermark = state.watermark()
    ends = pl.col(WINDOW_MS) + pipeline.window_ms
    late = pl.lit(False) if watermark is None else ends <= watermark
    outcome = pl.when(pl.col(REJECT).is_not_null()).then(pl.lit("dlq")).when(late).then(pl.lit("late"))
    rows = rows.with_columns(outcome.otherwise(pl.lit("counted")).alias("outcome"))
    key = [WINDOW_MS, *pipeline.dedup_by]
    candidates = rows.filter(pl.col("outcome") == "counted")
    if candidates.height:
        touched = [w for w in candidates[WINDOW_MS].unique().to_list() if w in state.windows]
        before = pl.concat([state.seen.clear(), *(state.windows[w] for w in touched)])
        known = before.select(key).with_columns(pl.lit(True).alias("_known"))
        marked = candidates.with_columns(pl.struct(key).is_first_distinct().alias("_first")).join(
            known, on=key, how="left", maintain_order="left"
        )
        repeats = marked.filter(~pl.col("_first") | pl.col("_known").is_not_null())["_row"]
        rows = rows.with_columns(
            pl.when(pl.col("_row").is_in(repeats.implode())).then(pl.lit("duplicates")).otherwise("outcome").alias("outcome")
        )
        winners = keep_winners(before, candidates.select(state.seen.columns), key)
        state.windows.update({w: f for (w,), f in winners.partition_by(WINDOW_MS, as_dict=True).items()})
    state.add_stats(day_counts(rows))  # a timestamp without a calendar day (DLQ'd) belongs to no day
    state.dirty = True
    return rows.drop("_row")


def keep_winners(seen: pl.DataFrame, new: pl.DataFrame, key: list[str]) -> pl.DataFrame:
    """Per key, the copy with the smallest (timestamp, source partition, source offset)."""
    touched = new.select(key).unique()
    contenders = pl.concat([seen.join(touched, on=key, how="semi"), new.cast(seen.schema)])  # type: ignore[arg-type]
    best = contenders.sort("timestamp_ms", SRC_PARTITION, SRC_OFFSET).unique(subset=key, keep="first")
    return pl.concat([seen.join(touched, on=key, how="anti"), best.select(seen.columns)])


def apply_progress(doc: Mapping[str, Any], state: ShuffleState) -> None:
    """Merge a stage-1 progress message; move the watermark (never back) and close windows."""
    state.n_sources = max(state.n_sources or 0, int(doc["sources"]))
    for partition, (max_ts, idle, ended) in doc["progress"].items():
        source = state.sources.setdefault(int(partition), SourceProgress())
        if max_ts is not None:
            source.max_ts = max_ts if source.max_ts is None else max(source.max_ts, max_ts)
        source.idle, source.ended = bool(idle), source.ended or bool(ended)
    floor = state.floor()
    if floor is not None and (state.max_ts is None or floor > state.max_ts):
        state.max_ts = floor
    state.dirty = True
    state.close_windows(state.watermark())


# ---------------------------------------------------------------- stage 2


class Stage2(Processor):
    """Windows, dedup, aggregation and results per repartition partition (S3 checkpoints as usual)."""

    def __init__(self, *args: Any, stage1_lag: Callable[[], int | None] | None = None, source_topic: str = "",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = ShuffleStore(self.client, self.store.bucket, self.prefix, self.store.writer)
        self.stage1_lag = stage1_lag
        #: stage 1's input: the topic a late record names, as single-stage late records do
        self.source_topic = source_topic or self.topic

    def consumer_config(self) -> dict[str, object]:
        config = super().consumer_config()
        return {**config, "group.id": keys.shuffle_group(self.group), "auto.offset.reset": "earliest",
                **SHUFFLE_PREFETCH}

    def bounded_end_offsets(self, partitions: int) -> dict[int, int]:
        """Bounded by stage 1's end markers, not offsets: end 0 lets ``finished`` see only ``finalized``."""
        return dict.fromkeys(range(partitions), 0)

    def records_left(self) -> int | None:
        return None  # the end is stage 1's end markers, not an offset

    def new_state(self, partition: int) -> PartitionState:
        return ShuffleState(self.pipeline, self.topic, self.group, partition, self.grace_ms)

    def start_offset(self, state: PartitionState) -> int:
        """The repartition topic only ever holds this group's data: without a checkpoint, read it all."""
        return OFFSET_BEGINNING if state.next_offset is None else state.next_offset

    def process(self, messages: Sequence[Any]) -> None:
        runs: dict[int, list[Any]] = {}
        eofs = []
        for message in messages:
            error = message.error()
            if error is None:
                runs.setdefault(message.partition(), []).append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                eofs.append((message.partition(), message.offset()))
            else:
                raise KafkaException(error)
        for partition, run in runs.items():
            state = self.states.get(partition)
            if isinstance(state, ShuffleState) and not state.finalized:
                self.process_run(state, run)
        for partition, offset in eofs:  # after the records: an EOF's offset is past them
            self.on_eof(partition, offset)

    def process_run(self, state: ShuffleState, run: list[Any]) -> None:
        """Consecutive data messages are folded together: the watermark only moves at progress messages."""
        frames: list[pl.DataFrame] = []
        for message in run:
            if state.finalized or message.offset() < (state.next_offset or 0):
                continue
            kind = dict(message.headers() or []).get(SHUFFLE_HEADER)
            if kind == DATA:
                frames.append(decode_frame(message.value()))
            elif kind == PROGRESS:
                self.fold(state, frames)
                frames = []
                apply_progress(json.loads(message.value()), state)
                self.finalize_if_ended(state, message.offset() + 1)
            else:
                log.warning("%s[%d]@%d: not a shuffle message, skipped", self.topic, state.partition, message.offset())
            state.next_offset, state.dirty = message.offset() + 1, True
        self.fold(state, frames)

    def fold(self, state: ShuffleState, frames: list[pl.DataFrame]) -> None:
        if not frames:
            return
        watermark = state.watermark()  # moves only at progress messages: the one every row of this fold met
        rows = apply_rows(pl.concat(frames, how="diagonal_relaxed"), state)
        late = rows.filter(pl.col("outcome") == "late")
        self.summary.records += rows.height
        self.summary.late_records += late.height
        if late.height:
            self.send_late_rows(late, watermark)

    def send_late_rows(self, late: pl.DataFrame, watermark: int | None) -> None:
        """Late rows to the late topic, byte-exact with single-stage's headers, through the DLQ producer:
        the checkpoint that counts them flushes it first. Rows shipped without the record (stage 1 ran
        without a grace) go without key and value, marked ``kappa.late.missing``."""
        assert watermark is not None, "a row is late only against a watermark"
        if RAW_VALUE not in late.columns:
            late = late.with_columns(
                pl.lit(None, pl.Binary).alias(RAW_KEY), pl.lit(None, pl.Binary).alias(RAW_VALUE),
                pl.lit(None, pl.Binary).alias(RAW_HEADERS),
                pl.col(SRC_PARTITION).alias(IN_PARTITION), pl.col(SRC_OFFSET).alias(IN_OFFSET),
            )
        columns = (RAW_KEY, RAW_VALUE, RAW_HEADERS, IN_PARTITION, IN_OFFSET, WINDOW_MS, "timestamp_ms")
        for key, value, own, partition, offset, window, timestamp in late.select(columns).iter_rows():
            stamped = late_headers(self.pipeline, self.source_topic, partition, offset, window, watermark)
            missing = [MISSING_HEADER] if value is None else []  # a valid (parsed) record always has a value
            headers = [*raw_headers(own), *stamped, *missing]
            self.produce_side(self.late_topic, key, value, headers, timestamp)

    def finalize_if_ended(self, state: ShuffleState, next_offset: int) -> None:
        """Bounded: every source partition sent its end marker: close everything, stop fetching."""
        if not self.bounded or not state.all_ended():
            return
        state.close_windows(ALWAYS)
        state.finalized, state.end_offset, state.next_offset, state.dirty = True, next_offset, next_offset, True
        self.pause_finished()

    def finalize_if_done(self, state: PartitionState) -> None:
        return  # finalized by end markers (finalize_if_ended)

    def on_eof(self, partition: int, offset: int) -> None:
        state = self.states.get(partition)
        if state is not None and not state.finalized and (state.next_offset is None or offset > state.next_offset):
            state.next_offset, state.dirty = offset, True

    def checkpoint(self, partitions: set[int] | None = None, flush_timeout: float = CHECKPOINT_FLUSH_S) -> None:
        for partition, state in self.states.items():
            if isinstance(state, ShuffleState) and state.dirty and (partitions is None or partition in partitions):
                state.refresh_open()
        super().checkpoint(partitions, flush_timeout)

    def report_progress(self) -> None:
        if isinstance(self.progress, NoProgress):
            return
        if self.bounded:
            self.lag = self.stage1_lag() if self.stage1_lag else None
            self.progress.update(self.summary.records, self.lag, self.summary.late_records)
        else:
            super().report_progress()


# ---------------------------------------------------------------- stage 1


class Stage1(Processor):
    """Parse, DLQ, and ship per-batch Arrow messages to the repartition topic, in Kafka transactions."""

    def __init__(self, *args: Any, repartition: str, partitions_out: int, instance: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.repartition, self.partitions_out, self.instance = repartition, partitions_out, instance
        self.sources = 0
        self.positions: dict[int, int | None] = {}
        self.source_progress: dict[int, SourceProgress] = {}
        self.committed_progress: dict[int, SourceProgress] = {}
        self.uncommitted = False
        #: stopping: the open transaction was given up (``abandon_transaction``), none begins again
        self.abandoned = False
        self.last_done_check = 0.0
        #: source partitions paused by ``align``; per partition (records read, first event time)
        self.held: set[int] = set()
        self.pace: dict[int, tuple[int, int]] = {}
        self.alignment_pauses = 0
        #: (records, dlq records) as of the last committed transaction: an aborted one's do not count
        self.counted = (0, 0)

    # ------------------------------------------------------------ lifecycle

    def run(self) -> RunSummary:
        started = time.monotonic()
        ensure_bucket(self.client, self.settings.s3_bucket)
        self.sources = kafka_helpers.partition_count(self.settings, self.topic)
        kafka_helpers.ensure_topic(self.settings, self.dlq_topic, self.sources)
        if self.bounded:
            self.end = self.bounded_end_offsets(self.sources)
            self.summary.end_offsets = dict(self.end)
        self.membership = membership.resolve("processor-stage1", self.group, self.instance_id, self.group_protocol)
        if self.membership.instance_id:  # a restart after kill -9 reuses it: its transactional id fences the dead twin
            self.instance = self.membership.instance_id
        self.new_producer()
        self.producer.begin_transaction()  # type: ignore[union-attr]
        self.consumer = Consumer(self.consumer_config())
        self.consumer.subscribe([self.topic], on_assign=self.on_assign, on_revoke=self.on_revoke, on_lost=self.on_lost)
        self.last_checkpoint = time.monotonic()
        try:
            self.loop()
            self.commit()
        except Stopped as exc:  # asked to stop while it recovered from a failure: nothing more is redone
            log.warning("stage 1 of group %s stopped while it recovered (%s)", self.group, exc)
            self.abandon_transaction(coordinator_silent=True)
        finally:
            kafka_helpers.close_within(self.consumer, self.close_limit())  # bounded, as the single-stage processor's
            self.membership.release()
        self.summary.seconds = round(time.monotonic() - started, 3)
        return self.summary

    def new_producer(self, abandon: bool = False) -> None:
        """The transactional producer; ``init_transactions`` aborts what an earlier one left open.
        ``abandon``: the old one is stuck in a call on another thread; leave it alone."""
        if self.producer is not None and not abandon:  # what it queues belongs to the aborted transaction
            with contextlib.suppress(Exception):
                self.producer.purge()
        self.producer = Producer(self.producer_config())
        retrying(lambda: self.producer.init_transactions(INIT_TRY_S), stop=self.stop)  # type: ignore[union-attr]

    def consumer_config(self) -> dict[str, object]:
        """A smaller prefetch than the single-stage processor's (both stages): the shuffle runs at
        stage 2's pace, which these fetches keep up with, and a smaller fetch is a shorter stretch of
        event time for ``align`` to pause (a pause drops the partition's prefetch)."""
        return {**super().consumer_config(), **SHUFFLE_PREFETCH}

    def producer_config(self) -> dict[str, object]:
        return self.settings.kafka_config(
            **{
                **DLQ_PRODUCER_CONFIG,
                "transactional.id": f"{self.group}-stage1-{self.instance}",
                "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
                "compression.type": "lz4",
                "linger.ms": 5,
                "message.max.bytes": MAX_MESSAGE_BYTES,
            }
        )

    def loop(self) -> None:
        assert self.consumer is not None
        while not self.stop.is_set():
            if not self.consume_step(timeout=0.2):
                continue
            try:
                if self.step_done():
                    self.summary.complete = True
                    return
            except KafkaException as exc:  # e.g. the consumer fenced: committed() fails with a bare _FATAL
                self.rejoin_or_raise(exc)

    def step_done(self) -> bool:
        """Commit when due; True once a bounded run is done (by us or the other members)."""
        due = time.monotonic() - self.last_checkpoint >= min(STAGE1_COMMIT_SECONDS, self.checkpoint_seconds)
        if due or (self.bounded and self.ended_uncommitted()):
            self.commit()
        return self.bounded and self.all_done()

    # ------------------------------------------------------------ rebalance

    def on_assign(self, consumer: Consumer, partitions: list[TP]) -> None:
        """Committed offset (the transaction's) > explicit start offset > bounded from-beginning > reset."""
        if consumer is not self.consumer:
            return  # a replaced consumer, closing on another thread (see rejoin)
        committed = committed_offsets(consumer, partitions)
        for tp, done in zip(partitions, committed, strict=True):
            self.positions[tp.partition], tp.offset = self.first_offset(tp.partition, done.offset)
            self.source_progress[tp.partition] = SourceProgress()
            self.committed_progress[tp.partition] = SourceProgress()
        self.fresh_group = False  # partitions assigned from now on are new ones: earliest
        consumer.assign(partitions)

    def first_offset(self, partition: int, committed: int) -> tuple[int | None, int]:
        if committed >= 0:
            return committed, committed
        if partition in self.start_offsets:
            return self.start_offsets[partition], self.start_offsets[partition]
        if self.bounded and self.start == "earliest":
            return None, OFFSET_BEGINNING
        return None, self.unknown_start()

    def on_revoke(self, consumer: Consumer, partitions: list[TP]) -> None:
        """Commit what we did (offsets + output, one transaction), then forget the revoked partitions."""
        if consumer is not self.consumer:
            return
        self.commit()
        self.forget({tp.partition for tp in partitions})

    def on_lost(self, consumer: Consumer, partitions: list[TP]) -> None:
        """Someone else owns them: our open transaction is void; the partitions we keep are rewound."""
        if consumer is not self.consumer:
            return
        self.forget({tp.partition for tp in partitions})
        self.abort_and_rewind()

    def rejoin(self, error: KafkaError) -> None:
        """Fenced by our own re-join, or the coordinator does not answer (see ``Processor.rejoin_or_raise``):
        abort the open transaction (its output is void), then join again with new clients."""
        assert self.producer is not None
        log.warning("stage 1 of group %s: %s (%s): open transaction aborted, rejoining", self.group,
                    membership.rejoin_cause(error), error.str())
        self.forget(set(self.positions))
        self.summary.records, self.summary.dlq_records = self.counted
        self.uncommitted = False
        self.replace_consumer()  # the old one's on_revoke/on_lost must not commit or rewind; it joins on consume()
        self.new_producer()  # its init aborts our open transaction, whatever state the old producer is in
        self.delivery_errors.clear()
        self.producer.begin_transaction()  # type: ignore[union-attr]

    def stop_instead_of_rejoining(self, error: KafkaError) -> None:
        log.warning("stage 1 of group %s: %s (%s) while stopping: not rejoining", self.group,
                    membership.rejoin_cause(error), error.str())
        self.forget(set(self.positions))
        self.abandon_transaction()

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            for table in (self.positions, self.source_progress, self.committed_progress, self.pace):
                table.pop(partition, None)
        self.held -= partitions

    # ------------------------------------------------------------ processing

    def process(self, messages: Sequence[Any]) -> None:
        batch = split_batch(messages, self.pipeline)
        frame = self.keep_new(batch.frame) if batch.frame.height else batch.frame
        if frame.height:
            chosen = [batch.messages[idx] for idx in frame["idx"].to_list()]
            headers = [m.headers() for m in chosen] if self.bounded or self.grace_ms is not None else []
            frame = self.with_source(frame, headers)
            if self.grace_ms is not None:
                frame = with_raw(frame, chosen, headers)
            fresh = self.not_covered(frame)
            self.send_to_dlq(fresh.filter(pl.col(REJECT).is_not_null()), batch.messages)
            self.ship(fresh)
            self.note_progress(frame, fresh)
            self.summary.records += fresh.height
        for partition, offset in batch.eofs:
            self.on_eof(partition, offset)
        if self.bounded:
            self.mark_ended()
        self.align()

    def align(self) -> None:
        """Keep the source partitions within ``ALIGN_RECORDS`` of each other in event time.

        Stage 2's watermark is the slowest source's event time, so a window stays open until every
        source passed it. librdkafka serves partitions unevenly: unaligned, a live run over 1M events
        kept sources ~9 hours apart and stage 2 held ~40 % of them in open windows. Pausing a
        partition drops what librdkafka prefetched of it; resuming fetches again from the next offset
        we did not consume, so nothing is skipped or read twice.
        """
        assert self.consumer is not None
        active = {p: s.max_ts for p, s in self.source_progress.items() if not (s.idle or s.ended)}
        floor = None if None in active.values() else min(active.values(), default=None)  # type: ignore[type-var]
        lead = {p: self.records_ahead(p, ts, floor) for p, ts in active.items()}
        ahead = {p for p, n in lead.items() if n > ALIGN_RECORDS}
        behind = {p for p in self.held if lead.get(p, 0) <= ALIGN_RECORDS // 2}
        if ahead - self.held:
            self.consumer.pause([TP(self.topic, p) for p in sorted(ahead - self.held)])
            self.alignment_pauses += len(ahead - self.held)
            log.info("stage 1: paused %s[%s], ~%d records ahead of the slowest source in event time", self.topic,
                     ",".join(map(str, sorted(ahead - self.held))), max(lead[p] for p in ahead - self.held))
        if behind:
            self.consumer.resume([TP(self.topic, p) for p in sorted(behind)])
        self.held = (self.held | ahead) - behind

    def records_ahead(self, partition: int, max_ts: int | None, floor: int | None) -> float:
        """About how many of the partition's records lie past ``floor``, from its records per ms so far.
        No floor (a source has not delivered a record yet, and may hold anything older): all of them."""
        pace = self.pace.get(partition)
        if pace is None or max_ts is None:
            return 0.0
        records, first_ts = pace
        if floor is None:
            return float(records)
        return 0.0 if max_ts <= first_ts else (max_ts - floor) * records / (max_ts - first_ts)

    def keep_new(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Owned partitions only, offsets not yet shipped and (bounded) below the end offsets."""
        owned = list(self.positions)
        bounds = pl.DataFrame(
            {
                "partition": owned,
                "_from": [self.positions[p] or 0 for p in owned],
                "_to": [self.end.get(p, ALWAYS) if self.bounded else ALWAYS for p in owned],
            },
            schema={"partition": pl.Int32, "_from": pl.Int64, "_to": pl.Int64},
        )
        frame = frame.join(bounds, on="partition", how="inner", maintain_order="left")
        return frame.filter((pl.col("offset") >= pl.col("_from")) & (pl.col("offset") < pl.col("_to"))).drop(
            "_from", "_to"
        )

    def not_covered(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Handoff: drop the records a promoted day's corrected report already counts (as the
        single-stage path does), before they are dead-lettered or shipped."""
        if self.switch is None or not self.switch.covered:
            return frame
        day, covered = day_of(pl.col("timestamp_ms")), pl.lit(False)
        for partition in frame["partition"].unique().to_list():
            rows = self.switch.covered_rows(partition, day, pl.col("offset"))
            covered = covered | ((pl.col("partition") == partition) & rows)
        return frame.filter(~covered)

    def with_source(self, frame: pl.DataFrame, headers: list[Any]) -> pl.DataFrame:
        """Source coordinates: a bounded run may read a replay topic (the archive's coordinates, in
        ``headers``, one per row); live, a record's own position is its source."""
        if self.bounded:
            return with_archive_source(frame, headers)
        return frame.with_columns(pl.col("partition").alias(SRC_PARTITION), pl.col("offset").alias(SRC_OFFSET))

    def ship(self, frame: pl.DataFrame) -> None:
        """One Arrow message per target partition for the whole micro-batch."""
        fields = [c for c in self.pipeline.parse([]).columns if c != REJECT]
        raw = [c for c in RAW_COLUMNS if c in frame.columns]
        rows = frame.select(SRC_PARTITION, SRC_OFFSET, "timestamp_ms", REJECT, *fields, *raw)
        rows = rows.with_columns(target_partitions(rows, self.pipeline.state_key, self.partitions_out).alias("_t"))
        for (target,), part in rows.partition_by("_t", as_dict=True).items():
            self.produce_internal(encode_frame(part.drop("_t")), int(target), DATA)  # type: ignore[call-overload]

    def produce_internal(self, value: bytes, partition: int, kind: bytes) -> None:
        assert self.producer is not None
        with refusal_aborts():
            while True:
                try:
                    self.producer.produce(
                        self.repartition, value=value, partition=partition, headers=[(SHUFFLE_HEADER, kind)],
                        on_delivery=self.delivered,
                    )
                    break
                except BufferError:
                    self.producer.poll(0.1)
            self.producer.poll(0)
        self.uncommitted = True

    def produce_side(self, topic: str, key: bytes | None, value: bytes | None, headers: list, timestamp: int) -> None:
        """Dead-letter and late records join the transaction: a refusal aborts it, as ``produce_internal``'s."""
        with refusal_aborts():
            super().produce_side(topic, key, value, headers, timestamp)

    def delivered(self, error: KafkaError | None, message: Any) -> None:
        """A repartition message that failed voids the transaction (librdkafka makes it abortable) and
        the redo ships it again: only noted. Dead-letter and late records go the engine's way."""
        if error is not None and message.topic() == self.repartition:
            self.delivery_errors.append(str(error))
            return
        super().delivered(error, message)

    def note_progress(self, frame: pl.DataFrame, shipped: pl.DataFrame) -> None:
        """Positions from every row read (``frame``); event time only from the valid rows shipped (a bad
        timestamp must not move the watermark, nor may a record the handoff left to a corrected report:
        the single-stage path never lets those touch its state either)."""
        per_partition = frame.group_by("partition").agg(
            pl.col("offset").max(), pl.len(), pl.col("timestamp_ms").min().alias("first_ts")
        )
        for partition, last, records, first_ts in per_partition.iter_rows():
            self.positions[partition] = last + 1
            self.source_progress[partition].idle = False
            seen, since = self.pace.get(partition, (0, first_ts))
            self.pace[partition] = (seen + records, since if first_ts is None else min(since or first_ts, first_ts))
        valid = shipped.filter(pl.col(REJECT).is_null())
        for partition, max_ts in valid.group_by("partition").agg(pl.col("timestamp_ms").max()).iter_rows():
            source = self.source_progress[partition]
            source.max_ts = max_ts if source.max_ts is None else max(source.max_ts, max_ts)
        self.uncommitted = True

    def on_eof(self, partition: int, offset: int) -> None:
        """At the end of a partition: our position is ``offset`` (past transaction markers); live: idle."""
        if partition not in self.positions:
            return
        if self.bounded:
            offset = min(offset, self.end[partition])
        position = self.positions[partition]
        if position is None or offset > position:
            self.positions[partition], self.uncommitted = offset, True
        if not self.bounded and not self.source_progress[partition].idle:
            self.source_progress[partition].idle, self.uncommitted = True, True

    def mark_ended(self) -> None:
        for partition, position in self.positions.items():
            source = self.source_progress[partition]
            if position is not None and position >= self.end[partition] and not source.ended:
                source.ended, self.uncommitted = True, True

    # ------------------------------------------------------------ transactions

    def commit(self) -> None:
        """Progress to every repartition partition, input offsets, commit: all or nothing."""
        self.last_checkpoint = time.monotonic()
        if not self.uncommitted or self.producer is None or self.consumer is None:
            return
        progress = {str(p): s.as_list() for p, s in sorted(self.source_progress.items())}
        body = json.dumps({"sources": self.sources, "progress": progress}).encode()
        offsets = [TP(self.topic, p, o) for p, o in sorted(self.positions.items()) if o is not None]
        # outside the try: a fenced consumer's error is the loop's (rejoin), not a failed transaction
        metadata = self.consumer.consumer_group_metadata() if offsets else None
        try:
            for target in range(self.partitions_out):
                self.produce_internal(body, target, PROGRESS)
            if offsets:
                self.transact(lambda: self.producer.send_offsets_to_transaction(offsets, metadata, CALL_TIMEOUT_S))  # type: ignore[union-attr]
            self.transact(lambda: self.producer.commit_transaction(CALL_TIMEOUT_S))  # type: ignore[union-attr]
        except KafkaException as exc:
            self.transaction_failed(exc)
            return
        except kafka_helpers.StuckCall as exc:
            if self.stop.is_set():
                log.warning("stage 1: %s", exc)
                self.abandon_transaction(coordinator_silent=True)
                return
            log.warning("stage 1: %s; replacing the transactional producer, redoing from the committed offsets", exc)
            self.new_producer(abandon=True)
            self.rewind()
            return
        if self.delivery_errors:
            raise KappaError(f"stage 1 could not write: {'; '.join(self.delivery_errors[:3])}")
        self.committed_progress = {p: SourceProgress(*s.as_list()) for p, s in self.source_progress.items()}
        self.counted = (self.summary.records, self.summary.dlq_records)
        self.uncommitted = False
        self.producer.begin_transaction()

    def transact(self, call: Callable[[], Any]) -> None:
        """A transactional call, retried while retriable (not once stopping), each try bounded by ``CALL_LIMIT_S``."""
        retrying(lambda: kafka_helpers.call_within(call, CALL_LIMIT_S), TRANSACTION_RETRY_S, stop=self.stop)

    def rejoin_or_raise(self, exc: KafkaException) -> None:
        """An abortable transaction error that reached the loop (a produce refused in ``process``, see
        ``refusal_aborts``) aborts and redoes; an error while doing so goes the processor's way."""
        if exc.args[0].txn_requires_abort():
            try:
                self.transaction_failed(exc)
                return
            except KafkaException as again:  # e.g. the consumer fenced while rewinding: rejoin
                exc = again
        super().rejoin_or_raise(exc)

    def transaction_failed(self, exc: KafkaException) -> None:
        """Fenced (a newer generation or producer owns our work): stop, a restart rejoins. Our static
        member fenced: the loop rejoins. Otherwise abort and redo from the committed offsets."""
        error = exc.args[0]
        if membership.is_fenced_instance(error):  # our static member, fenced by its own re-join
            raise exc
        if error.fatal() or not (error.txn_requires_abort() or error.retriable()):
            raise unrecoverable(error)
        if not self.stop.is_set():  # stopping, nothing is redone: abort_and_rewind gives the transaction up
            log.warning("stage 1 transaction aborted (%s); redoing from the committed offsets", error.str())
        self.abort_and_rewind(coordinator_silent=error.code() == KafkaError._TIMED_OUT)

    def abort_and_rewind(self, coordinator_silent: bool = False) -> None:
        """Abort, or (the coordinator does not answer: after a broker restart librdkafka's transaction
        coordinator connection can stay down) replace the producer, whose init aborts the open
        transaction on the broker. Either way the offsets committed with the last transaction stand.
        ``coordinator_silent``: a call already timed out on it, so an abort would wait out its
        timeout too; the producer is replaced at once. Stopping: nothing is redone (``abandon_transaction``)."""
        assert self.producer is not None
        if self.stop.is_set():
            self.abandon_transaction(coordinator_silent)
            return
        producer = self.producer
        if coordinator_silent:
            log.warning("stage 1: the transaction coordinator does not answer; replacing the transactional producer")
            self.new_producer()
        else:
            try:
                kafka_helpers.call_within(lambda: producer.abort_transaction(ABORT_TIMEOUT_S), ABORT_LIMIT_S)
            except (KafkaException, kafka_helpers.StuckCall) as exc:
                if isinstance(exc, KafkaException) and exc.args[0].fatal():
                    # fenced: a producer with our transactional id took over; a new one would fence it back
                    raise unrecoverable(exc.args[0]) from None
                log.warning("stage 1 abort failed (%s); replacing the transactional producer", exc)
                self.new_producer(abandon=isinstance(exc, kafka_helpers.StuckCall))
        self.rewind()

    def abandon_transaction(self, coordinator_silent: bool = False) -> None:
        """Stopping: the open transaction is aborted in one try bounded by the transaction timeout
        (after which the broker aborts it anyway), never redone or replaced by a new producer: the
        next run starts from the offsets committed with the last transaction. Its counts go too."""
        if self.abandoned:
            return
        self.abandoned, self.uncommitted = True, False
        self.summary.records, self.summary.dlq_records = self.counted
        producer = self.producer
        if coordinator_silent or producer is None:
            log.warning("stage 1 stopping: its open transaction is left to the broker, which aborts it "
                        "within %.0f s; the next run redoes it from the committed offsets", CALL_TIMEOUT_S)
            return
        try:
            kafka_helpers.call_within(lambda: producer.abort_transaction(CALL_TIMEOUT_S), CALL_TIMEOUT_S + 1)
            log.warning("stage 1 stopping: its open transaction is aborted; the next run redoes it from the "
                        "committed offsets")
        except (KafkaException, kafka_helpers.StuckCall) as exc:
            log.warning("stage 1 stopping: its open transaction could not be aborted (%s); the broker aborts it "
                        "within %.0f s, the next run redoes it from the committed offsets", exc, CALL_TIMEOUT_S)

    def rewind(self) -> None:
        """Back to the offsets and source progress of the last committed transaction; a new one begins."""
        assert self.producer is not None and self.consumer is not None
        self.delivery_errors.clear()
        self.summary.records, self.summary.dlq_records = self.counted
        if self.held:  # unpaused before the seeks: a resume must not restart from the position we abandon
            self.consumer.resume([TP(self.topic, p) for p in sorted(self.held)])
            self.held = set()
        owned = [TP(self.topic, p) for p in sorted(self.positions)]
        for tp in committed_offsets(self.consumer, owned):
            self.positions[tp.partition], offset = self.first_offset(tp.partition, tp.offset)
            self.source_progress[tp.partition] = SourceProgress(*self.committed_progress[tp.partition].as_list())
            # nothing committed yet and no explicit start: what auto.offset.reset (earliest) gave at assign
            self.consumer.seek(TP(self.topic, tp.partition, OFFSET_BEGINNING if offset == OFFSET_STORED else offset))
        self.uncommitted = False
        self.producer.begin_transaction()

    # ------------------------------------------------------------ bounded end

    def ended_uncommitted(self) -> bool:
        return self.uncommitted and any(
            s.ended and not self.committed_progress.get(p, SourceProgress()).ended
            for p, s in self.source_progress.items()
        )

    def all_done(self) -> bool:
        """Every source partition's committed offset reached its end (by us or another member)."""
        if self.uncommitted or time.monotonic() - self.last_done_check < 1.0:
            return False
        self.last_done_check = time.monotonic()
        assert self.consumer is not None
        committed = committed_offsets(self.consumer, [TP(self.topic, p) for p in self.end])
        return all(tp.offset >= self.end[tp.partition] for tp in committed)

    def records_left(self) -> int | None:
        if not self.bounded or not self.positions or None in self.positions.values():
            return None
        return self.remaining()

    def remaining(self) -> int | None:
        if not self.end:
            return None
        return sum(max(0, end - (self.positions.get(p) or 0)) for p, end in self.end.items() if p in self.positions)


@contextlib.contextmanager
def refusal_aborts() -> Iterator[None]:
    """A produce refused with ``_STATE`` means librdkafka moved our transaction into an abortable
    error on its own thread: a failed delivery, or "skipped sequence numbers" after a broker restart.
    No record can join it any more. Raised as the abortable transaction error it is, wherever the
    produce ran (``process``, ``commit``, a delivery or rebalance callback), so that ``commit``
    (``transaction_failed``) and the loop (``rejoin_or_raise``) abort it and redo from the committed
    offsets. A fenced producer is refused with ``_FATAL`` instead, which stays fatal."""
    try:
        yield
    except KafkaException as exc:
        # already raised as abortable: a re-send from a delivery callback, inside another produce's poll
        if exc.args[0].code() != KafkaError._STATE or exc.args[0].txn_requires_abort():
            raise
        reason = f"produce refused, the transaction must be aborted: {exc.args[0].str()}"
        raise KafkaException(KafkaError(KafkaError._STATE, reason, txn_requires_abort=True)) from None


def committed_offsets(consumer: Consumer, partitions: list[TP]) -> list[TP]:
    """The group's committed offsets (the last transaction's), retried for ``COMMITTED_RETRY_S``.
    A coordinator that still does not answer is a stuck client more often than a slow broker: the
    timeout then reaches the loop, which rejoins with new clients (``Processor.rejoin_or_raise``)."""
    if not partitions:
        return []
    return retrying(lambda: consumer.committed(partitions, timeout=COMMITTED_TIMEOUT_S), COMMITTED_RETRY_S,
                    timeouts=False)


def unrecoverable(error: KafkaError) -> KappaError:
    """A transaction error no abort or new producer mends (fenced, not authorized): the run ends."""
    return KappaError(f"stage 1 transaction failed ({error.str()}); a restart resumes from the last commit")


# ---------------------------------------------------------------- both stages


class EitherStop(threading.Event):
    """Set by itself or by the caller's stop event (signals), so each stage can be stopped alone."""

    def __init__(self, outer: threading.Event) -> None:
        super().__init__()
        self.outer = outer

    def is_set(self) -> bool:
        return super().is_set() or self.outer.is_set()


def run_shuffled(
    settings: Settings,
    pipeline: Pipeline,
    *,
    stage: Stage,
    shuffle_partitions: int | None,
    progress: Progress,
    stop: threading.Event,
    **options: Any,
) -> RunSummary:
    """Stage 1 and stage 2 (``both``: stage 1 in a thread) or one of them (``--stage 1|2``)."""
    check_state_key(pipeline)
    topic, group = options["topic"], options["group"]
    sources = kafka_helpers.partition_count(settings, topic)
    if shuffle_partitions is not None and shuffle_partitions < 1:
        raise KappaError("--shuffle-partitions must be >= 1")
    repartition = keys.repartition_topic(group, pipeline.state_key)
    prefix = keys.processor_prefix(pipeline.name, pipeline.version, group if options["bounded"] else None)
    names = {"topic": topic, "group": group, "repartition": repartition}
    switch = options.get("switch")
    if switch is not None and claim_live_prefix(s3_client(settings), settings.s3_bucket, prefix, switch.origin):
        # before prepare_internals: the cleared prefix has no shuffle marker, so the old stage-1
        # offsets, repartition topic and stage-2 group go too (explicit start offsets win)
        log.warning("explicit start offsets win: removed the older checkpoint under %s", prefix)
    partitions_out = prepare_internals(settings, stage, prefix, names, shuffle_partitions or sources, stop)
    instance = options.pop("instance", None) or os.environ.get(INSTANCE_ENV) or uuid.uuid4().hex[:12]
    stop1, stop2 = EitherStop(stop), EitherStop(stop)
    stage1 = Stage1(
        settings, pipeline, **options, progress=progress if stage == "1" else NoProgress(), stop=stop1,
        repartition=repartition, partitions_out=partitions_out, instance=instance,
    )
    if stage == "1":
        return stage1.run()
    stage2_options = {**options, "topic": repartition, "start_offsets": None, "end_offsets": None, "switch": None}
    lag = stage1.remaining if stage == "both" else None
    stage2 = Stage2(settings, pipeline, **stage2_options, progress=progress, stop=stop2, stage1_lag=lag,
                    source_topic=topic)
    if stage == "2":
        return stage2.run()
    return run_both(stage1, stage2, stop1, stop2)


def run_both(stage1: Stage1, stage2: Stage2, stop1: threading.Event, stop2: threading.Event) -> RunSummary:
    failure: list[BaseException] = []

    def first_stage() -> None:
        try:
            stage1.run()
        except BaseException as exc:  # handed to the main thread below
            failure.append(exc)
            stop2.set()

    thread = threading.Thread(target=first_stage, name="kappa-stage1", daemon=True)
    thread.start()
    try:
        summary = stage2.run()
    finally:
        stop1.set()
        thread.join(STAGE1_JOIN_TIMEOUT_S)  # a stage 1 stuck on an unreachable broker must not hang the exit
    if failure:
        raise failure[0]
    summary.topic, summary.end_offsets = stage1.topic, stage1.summary.end_offsets
    summary.records, summary.dlq_records = stage1.summary.records, stage1.summary.dlq_records
    return summary
