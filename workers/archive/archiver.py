"""The archiver: every Kafka record, byte-exact, in Parquet on S3, exactly once after dedup.

The raw archive is the source of truth, so nothing may be lost or skipped silently: the resume point
is a fenced checkpoint in S3 (never the Kafka commit), written only after the files. The steps,
fencing and refusal rules are in docs/ARCHITECTURE.md ("The archiver", "Commits and fencing").
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import polars as pl
from boto3.s3.transfer import TransferConfig
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from workers import kafka as kafka_helpers
from workers import keys, membership, retry
from workers import s3 as s3_helpers
from workers.archive import checkpoint as archiver_checkpoint
from workers.archive import format as archive_format
from workers.archive.checkpoint import ArchiverCheckpoint
from workers.archive.flusher import BackgroundFlushes, Flushed, FlushJob
from workers.config import Settings
from workers.errors import KappaError
from workers.perf import gc_paused
from workers.s3 import Fenced

log = logging.getLogger("kappa.archiver")

#: A log end below the S3 checkpoint is re-read this many times before the archiver refuses (one
#: answer from a broker that just restarted or moved leadership can lag behind the log it serves).
WATERMARK_CONFIRMATIONS = 3
#: archive files of this size or more are uploaded in parts (S3's smallest part is 5 MiB)
MULTIPART_BYTES = 64 * 1024 * 1024
MULTIPART_PART_BYTES = 16 * 1024 * 1024
T = TypeVar("T")


class Unread:
    """Marker for "the ETag this store read last" (``None`` already means "no checkpoint yet")."""


UNREAD = Unread()


class ArchiverError(KappaError):
    """The archiver could not make its buffer durable (data stays in Kafka for the next run)."""


#: consume() timeout while flushes are in flight: how soon a landed flush is committed
FLUSH_POLL_S = 0.02
#: librdkafka's prefetch cap (counted in message bytes): memory outside the flush buffers' budget
QUEUE_KBYTES = 32 * 1024
#: a consumer still without a group member id this long after subscribing never got into its group
#: (the join stuck like a commit can); it is replaced the same way. An idle member has an id.
JOIN_LIMIT_S = 90.0


@dataclass(frozen=True)
class ArchiverOptions:
    """Tuning knobs; defaults give ~tens of MB Parquet files per partition and day."""

    #: None: ``<KAPPA_GROUP_PREFIX>.archiver`` (:func:`workers.keys.archiver_group`)
    group: str | None = None
    topic: str | None = None
    flush_bytes: int = 32 * 1024 * 1024
    flush_records: int = 1_000_000
    flush_seconds: float = 60.0
    max_buffer_bytes: int = 128 * 1024 * 1024  # buffered plus in flight to S3
    flush_threads: int = 4
    multipart_bytes: int = MULTIPART_BYTES
    batch_size: int = 10_000
    poll_timeout: float = 0.5
    until_end: bool = False
    idle_exit: float | None = None
    session_timeout: float = 45.0
    log_interval: float = 10.0
    metrics_port: int | None = None
    max_backoff: float = retry.MAX_BACKOFF_S
    revoke_timeout: float = 30.0
    shutdown_timeout: float = 60.0
    #: an offset commit not answered by then means a stuck coordinator connection: new consumer
    commit_timeout: float = kafka_helpers.COMMIT_LIMIT_S
    #: static membership (``None``: ``KAPPA_INSTANCE_ID`` or the per-host default) and group protocol
    instance_id: str | None = None
    group_protocol: str | None = None
    #: skip offsets Kafka deleted before they were archived (logged and counted) instead of refusing
    accept_data_loss: bool = False

    def validate(self) -> ArchiverOptions:
        positive = {
            "--flush-bytes": self.flush_bytes, "--flush-records": self.flush_records,
            "--flush-seconds": self.flush_seconds, "--batch-size": self.batch_size,
            "--max-buffer-bytes": self.max_buffer_bytes,
            "--poll-timeout": self.poll_timeout, "--log-interval": self.log_interval,
            "--max-backoff": self.max_backoff, "--flush-threads": self.flush_threads,
            "--commit-timeout": self.commit_timeout,
        }
        for name, value in positive.items():
            if value <= 0:
                raise KappaError(f"{name} must be > 0, got {value}")
        if self.multipart_bytes < 5 * 1024 * 1024:
            raise KappaError(f"--multipart-bytes must be at least 5MiB (S3's smallest part), "
                             f"got {self.multipart_bytes}")
        if self.idle_exit is not None and self.idle_exit <= 0:
            raise KappaError(f"--idle-exit must be > 0 seconds, got {self.idle_exit}")
        if not 6 <= self.session_timeout <= 300:
            raise KappaError(f"--session-timeout must be between 6 and 300 seconds, got {self.session_timeout}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise KappaError(f"--metrics-port {self.metrics_port} is not a TCP port")
        if self.group is not None and not self.group.strip():
            raise KappaError("--group must not be empty")
        membership.validate(self.instance_id, self.group_protocol)
        return self


def parse_size(text: str) -> int:
    """``"64MiB"``, ``"500kB"``, ``"1048576"`` -> bytes (a clear error for anything else)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    number = text.strip().lower().rstrip("bikmg")
    unit = text.strip().lower()[len(number):]
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise KappaError(f"size {text!r} is not understood; use e.g. 64MiB, 500kB or 1048576") from None


# ---------------------------------------------------------------- pure layout (the archive contract)


def has_day() -> pl.Expr:
    """True for rows whose timestamp has a ``YYYY-MM-DD`` day (see :data:`workers.keys.MAX_DAY_MS`)."""
    return pl.col("timestamp").dt.epoch("ms").is_between(keys.MIN_DAY_MS, keys.MAX_DAY_MS)


def split_by_day(frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """``[(day, rows of that UTC day in offset order)]``: a late record goes to the day it belongs to.
    Rows without a calendar day are left out (see :func:`archive_objects`)."""
    with_day = archive_format.with_day(frame.filter(has_day()))
    parts = with_day.partition_by("dt", as_dict=True, maintain_order=True)
    return sorted((str(day), rows.drop("dt")) for (day,), rows in parts.items())


def archive_objects(topic: str, partition: int, frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """The ``(object key, rows)`` a flush of one partition's buffer writes: one per day, plus one
    quarantine object for timestamps past 9999-12-31 or before 0001-01-01 (no day to file them under)."""
    objects = []
    for day, rows in split_by_day(frame):
        first, last = rows["offset"].min(), rows["offset"].max()
        objects.append((keys.raw_file(topic, day, partition, int(first), int(last)), rows))  # type: ignore[arg-type]
    stray = frame.filter(~has_day())
    if stray.height:
        first, last = stray["offset"].min(), stray["offset"].max()
        objects.append((keys.quarantine_file(topic, partition, int(first), int(last)), stray))  # type: ignore[arg-type]
        log.warning("%d records of %s[%d] have a timestamp outside 0001-01-01..9999-12-31: archived under %s",
                    stray.height, topic, partition, objects[-1][0])
    return objects


# ---------------------------------------------------------------- S3 side


class ArchiveStore:
    """Archive files and per-partition checkpoints of one topic in one bucket.

    The store remembers, per partition, the ETag of the checkpoint it read (or wrote) last, and
    writes the next checkpoint only if S3 still holds that one (``If-Match``; ``If-None-Match: *``
    for a partition never archived): compare-and-swap on the one checkpoint key, so readers keep a
    fixed key and a stale writer gets :class:`~workers.s3.Fenced`. Before writing files it checks the
    same condition (a HEAD), so a zombie that wakes up after the takeover adds no files. Between
    that check and the checkpoint PUT a zombie's files can still land; they hold exactly the records
    of their offset range, so they are overlapping copies readers drop, never wrong data, and they
    are never deleted (the new owner may have written the same key).
    """

    def __init__(self, client: Any, bucket: str, topic: str) -> None:
        self.client, self.bucket, self.topic = client, bucket, topic
        self.etags: dict[int, str | None] = {}
        self.topic_id: str | None = None  # the Kafka topic id, recorded in checkpoints

    def read_checkpoint(self, partition: int) -> int | None:
        """The next offset to archive, or None if this partition was never archived here."""
        checkpoint = self.read_checkpoint_doc(partition)
        return None if checkpoint is None else checkpoint.next_offset

    def read_checkpoint_doc(self, partition: int) -> ArchiverCheckpoint | None:
        """The checkpoint; also makes it the one the next :meth:`write_checkpoint` must replace."""
        stored = s3_helpers.get_stored(self.client, self.bucket, keys.archiver_checkpoint(self.topic, partition))
        self.etags[partition] = None if stored is None else stored.etag
        return None if stored is None else archiver_checkpoint.from_json(stored.body, self.topic, partition)

    def forget(self, partition: int) -> None:
        """This member no longer owns ``partition``: a write needs a fresh :meth:`read_checkpoint`."""
        self.etags.pop(partition, None)

    def expected(self, partition: int) -> str | None:
        """The checkpoint ETag this member's next write must replace (:class:`Fenced` if not assigned here)."""
        if partition not in self.etags:
            raise Fenced(keys.archiver_checkpoint(self.topic, partition), None,
                         f"partition {partition}: no checkpoint read by this member (not assigned here)")
        return self.etags[partition]

    def write_files(self, partition: int, frame: pl.DataFrame, *, expected: str | Unread | None = UNREAD,
                    multipart_bytes: int = MULTIPART_BYTES) -> tuple[list[str], int]:
        """Write the buffer as one Parquet object per day; returns (keys, bytes written).

        Raises :class:`Fenced` first, without writing, if another member checkpointed meanwhile.
        A file of ``multipart_bytes`` or more goes up as a multipart upload (parts in parallel).
        """
        etag = self.expected(partition) if isinstance(expected, Unread) else expected
        s3_helpers.still_at(self.client, self.bucket, keys.archiver_checkpoint(self.topic, partition), etag)
        written, size = [], 0
        for key, rows in archive_objects(self.topic, partition, frame):
            body = archive_format.to_parquet_bytes(rows)
            if len(body) >= multipart_bytes:
                config = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=MULTIPART_PART_BYTES)
                self.client.upload_fileobj(io.BytesIO(body), self.bucket, key, Config=config)
            else:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
            written.append(key)
            size += len(body)
        return written, size

    def write_checkpoint(self, partition: int, next_offset: int, group: str, files: list[str], *,
                         expected: str | Unread | None = UNREAD) -> str:
        """Compare-and-swap the checkpoint; returns (and, when ``expected`` is not given, remembers) its ETag."""
        checkpoint = ArchiverCheckpoint(self.topic, partition, next_offset, self.topic_id, group, files=files)
        remember = isinstance(expected, Unread)
        etag = self.expected(partition) if remember else expected
        new = s3_helpers.put_if(self.client, self.bucket, keys.archiver_checkpoint(self.topic, partition),
                                archiver_checkpoint.to_json(checkpoint), etag)  # type: ignore[arg-type]
        if remember:
            self.etags[partition] = new
        return new

    def write(self, partition: int, frames: list[pl.DataFrame], group: str, expected: str | None,
              multipart_bytes: int = MULTIPART_BYTES) -> Flushed:
        """Files, then the checkpoint, against the ETag read when the flush was handed out. Safe on a
        flush thread: it touches no shared state, so a flush that outlives its assignment (lost,
        revoked, fenced) can only fail its compare-and-swap, never move a newer owner's checkpoint."""
        frame = pl.concat(frames, rechunk=True) if len(frames) > 1 else frames[0]
        next_offset = int(frame["offset"].max()) + 1  # type: ignore[arg-type]
        files, size = self.write_files(partition, frame, expected=expected, multipart_bytes=multipart_bytes)
        etag = self.write_checkpoint(partition, next_offset, group, files, expected=expected)
        return Flushed(next_offset, len(files), size, etag)


# ---------------------------------------------------------------- per-partition buffer


@dataclass
class PartitionBuffer:
    """What one assigned partition holds in memory and how far it is durable."""

    durable: int | None = None  # next offset not yet in S3 (the checkpoint)
    position: int | None = None  # next offset after what has been buffered
    eof: int | None = None  # end offset reported by the last partition EOF
    frames: list[pl.DataFrame] = field(default_factory=list)
    records: int = 0
    bytes: int = 0
    in_flight: int = 0  # records handed to a flush thread, not yet durable
    in_flight_since: float | None = None  # when the oldest of them arrived
    oldest: float | None = None  # monotonic time the oldest buffered record arrived
    paused: bool = False
    refused: bool = False  # Kafka deleted offsets we never archived: not consumed until an operator decides
    backoff: retry.Backoff = field(default_factory=retry.Backoff)

    def add(self, frame: pl.DataFrame, now: float) -> None:
        self.frames.append(frame)
        self.records += frame.height
        self.bytes += frame.estimated_size()
        self.position = int(frame["offset"][-1]) + 1
        self.oldest = self.oldest if self.oldest is not None else now

    def detach(self) -> tuple[list[pl.DataFrame], int, int]:
        """Hand the buffer to a flush; consuming goes on into a fresh one."""
        taken = self.frames, self.records, self.bytes
        self.in_flight, self.in_flight_since = self.records, self.oldest
        self.frames, self.records, self.bytes, self.oldest = [], 0, 0, None
        return taken

    def restore(self, frames: list[pl.DataFrame], records: int, size: int) -> None:
        """A failed flush's records go back in front of what was consumed meanwhile (offset order)."""
        self.frames = frames + self.frames
        self.records += records
        self.bytes += size
        self.oldest = self.in_flight_since if self.in_flight_since is not None else self.oldest
        self.in_flight, self.in_flight_since = 0, None

    def due(self, options: ArchiverOptions, now: float, end: int | None) -> bool:
        """Ready for a flush: something buffered, none in flight, no backoff, a threshold reached."""
        if not self.records or self.in_flight or self.backoff.waiting(now):
            return False
        return self.over_threshold(options, now, end)

    def over_threshold(self, options: ArchiverOptions, now: float, end: int | None) -> bool:
        at_end = end is not None and self.position is not None and self.position >= end
        return (
            self.records >= options.flush_records
            or self.bytes >= options.flush_bytes
            or now - (self.oldest or now) >= options.flush_seconds
            or at_end
        )

    def landed(self, next_offset: int) -> None:
        self.in_flight, self.in_flight_since = 0, None
        self.durable = next_offset
        self.backoff.reset()

    def reached(self, end: int) -> bool:
        """Nothing buffered and everything before ``end`` durable (or the partition is empty)."""
        return self.records == 0 and not self.in_flight and (end == 0 or max(self.durable or 0, self.eof or 0) >= end)


# ---------------------------------------------------------------- counters


@dataclass
class ArchiverSummary:
    """Totals of one run (also exported as Prometheus metrics)."""

    consumed: int = 0
    records: int = 0
    bytes_in: int = 0
    bytes_written: int = 0
    files: int = 0
    checkpoints: int = 0
    s3_errors: int = 0
    fences: int = 0
    skipped_offsets: int = 0
    seconds: float = 0.0


class ArchiverMetrics:
    """Prometheus metrics in a registry of their own (several archivers may share a process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.server: Any = None
        registry = self.registry
        self.consumed = Counter("kappa_archiver_consumed_records", "Records read from Kafka", registry=registry)
        self.records = Counter("kappa_archiver_records", "Records written to the archive", registry=registry)
        self.bytes_in = Counter("kappa_archiver_input_bytes", "In-memory bytes of records read", registry=registry)
        self.bytes = Counter("kappa_archiver_written_bytes", "Parquet bytes written to S3", registry=registry)
        self.files = Counter("kappa_archiver_files", "Archive files written", registry=registry)
        self.s3_errors = Counter("kappa_archiver_s3_errors", "Failed S3 calls (retried)", registry=registry)
        self.fences = Counter("kappa_archiver_fenced_flushes", "Flushes refused because another member "
                              "checkpointed the partition (zombie)", registry=registry)
        self.lag = Gauge("kappa_archiver_lag", "Records not yet archived", ["partition"], registry=registry)
        self.buffered = Gauge("kappa_archiver_buffered_records", "Records in memory", registry=registry)
        self.paused = Gauge("kappa_archiver_paused_partitions", "Partitions paused by S3 errors", registry=registry)
        self.refused = Gauge("kappa_archiver_refused_partitions",
                             "Partitions not archived: Kafka deleted offsets never archived (see --accept-data-loss)",
                             registry=registry)
        self.skipped = Counter("kappa_archiver_skipped_offsets",
                               "Offsets deleted from Kafka before they were archived, skipped with --accept-data-loss",
                               registry=registry)

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on ``port`` until :meth:`close` (a clear error if the port is taken)."""
        try:
            self.server, _thread = start_http_server(port, registry=self.registry)
        except OSError as exc:
            raise KappaError(f"--metrics-port {port} cannot be used: {exc.strerror}") from None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


# ---------------------------------------------------------------- the consumer loop


class Archiver:
    """One member of the archiver consumer group. ``run()`` until ``stop`` is set (or the end)."""

    def __init__(self, settings: Settings, options: ArchiverOptions = ArchiverOptions(),
                 stop: threading.Event | None = None) -> None:
        # only None means the default: an empty --group is still refused by validate()
        group = keys.archiver_group(settings.group_prefix) if options.group is None else options.group
        self.settings, self.options = settings, replace(options, group=group).validate()
        self.topic = keys.valid_topic(settings.events_topic if options.topic is None else options.topic)
        self.stop = stop or threading.Event()
        self.store = ArchiveStore(s3_helpers.s3_client(settings, retries=2), settings.s3_bucket, self.topic)
        self.parts: dict[int, PartitionBuffer] = {}
        self.flushes: BackgroundFlushes[PartitionBuffer] = BackgroundFlushes(self.options.flush_threads)
        #: partitions whose flush was fenced: re-read and re-seeked by the loop (never inside a callback)
        self.refetch: set[int] = set()
        self.ends: dict[int, int] = {}
        self.summary, self.metrics = ArchiverSummary(), ArchiverMetrics()
        self.assigned_once = self.closing = False
        self.next_others_check = 0.0
        self.waiting_for: list[int] = []
        self.membership = membership.Membership()
        self.consumer: Consumer | None = None
        #: the current consumer's offset commits (a new tracker with each consumer)
        self.commits = kafka_helpers.OffsetCommits(self.topic, self.options.commit_timeout)
        #: why the consumer must be replaced (a commit that did not return); acted on by the loop
        self.stuck: str | None = None
        self.unanswered = membership.UnansweredBudget()
        self.subscribed_at = 0.0
        self.last_activity = self.last_report = time.monotonic()

    # -- lifecycle

    def run(self) -> ArchiverSummary:
        """Consume, flush, checkpoint, commit until stopped; then drain everything and leave the group."""
        started = time.monotonic()
        self._prepare()
        self.membership = membership.resolve("archiver", self.options.group, self.options.instance_id,
                                             self.options.group_protocol)
        log.info("joining group %s as %s (protocol %s)", self.options.group,
                 self.membership.instance_id or "a dynamic member", self.membership.protocol)
        self.last_activity = time.monotonic()
        try:
            if self.options.metrics_port is not None:
                self.metrics.serve(self.options.metrics_port)
            self._subscribe()
            budget = kafka_helpers.ConsumeBudget(self.options.batch_size)
            while not self._should_stop():
                with gc_paused():  # consume + ingest allocate only acyclic per-record objects
                    self._consume_batch(budget)
                self._check_commits()
                if self.stuck is None and self._not_joined():
                    self.stuck = f"no group member id {JOIN_LIMIT_S:.0f}s after subscribing"
                if self.stuck is not None:
                    self._rejoin(self.stuck)
            self._drain(time.monotonic() + self.options.shutdown_timeout)
        finally:
            self.closing = True
            self.flushes.close()
            kafka_helpers.close_within(self.consumer)  # its revoke callback runs
            self.membership.release()
            self.metrics.close()
            self.summary.seconds = time.monotonic() - started
            self._report(time.monotonic(), force=True)
        return self.summary

    def _subscribe(self) -> None:
        self.subscribed_at = time.monotonic()
        self.commits = kafka_helpers.OffsetCommits(self.topic, self.options.commit_timeout)
        self.consumer = Consumer(self._consumer_config())
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)

    def _rejoin(self, reason: str) -> None:
        """Replace a consumer whose group coordinator connection is stuck (``membership.UnansweredBudget``).

        Everything durable is in S3 already; the buffers are dropped as on a lost assignment and
        re-read from the S3 checkpoints by whoever gets the partitions (fenced: nothing doubled).
        """
        self.stuck = None
        if not self.unanswered.take(time.monotonic()):
            raise ArchiverError(f"the Kafka group coordinator did not answer ({reason}) {self.unanswered.limit} "
                                f"times within {self.unanswered.window_s:.0f}s; is Kafka reachable?")
        log.warning("group %s did not answer in time (%s): buffers of partitions %s dropped unwritten (re-read "
                    "from the S3 checkpoint), rejoining", self.options.group, reason, sorted(self.parts))
        self._forget(list(self.parts))
        old, self.consumer = self.consumer, None  # its callbacks, run by close(), see it is not ours
        kafka_helpers.close_within(old)
        self._subscribe()

    def _not_joined(self) -> bool:
        """No partitions and no member id ``JOIN_LIMIT_S`` after subscribing: the join never completed."""
        if self.consumer is None or self.parts or time.monotonic() - self.subscribed_at < JOIN_LIMIT_S:
            return False
        try:
            return not self.consumer.memberid()
        except (KafkaException, RuntimeError):
            return False

    def _consume_batch(self, budget: kafka_helpers.ConsumeBudget) -> None:
        """A function of its own so the messages are freed before the collector resumes (see gc_paused)."""
        assert self.consumer is not None
        messages = self.consumer.consume(num_messages=budget.messages(), timeout=self._poll_timeout())
        budget.observe(messages)
        self._step(messages)

    def _poll_timeout(self) -> float:
        """Short while a flush is in flight: its commit (and --until-end's stop) waits for the next
        return of ``consume()``, which with nothing left to read is the whole poll timeout."""
        return min(self.options.poll_timeout, FLUSH_POLL_S) if self.flushes.jobs else self.options.poll_timeout

    def _prepare(self) -> None:
        """Fail fast on a missing topic or an unusable bucket; read end offsets for --until-end."""
        kafka_helpers.partition_count(self.settings, self.topic)
        self.store.topic_id = kafka_helpers.topic_id(self.settings, self.topic)
        try:
            s3_helpers.ensure_bucket(self.store.client, self.store.bucket)
        except retry.S3_ERRORS as exc:
            where = self.settings.s3_endpoint_url or "AWS S3"
            raise ArchiverError(
                f"bucket {self.store.bucket!r} at {where} is not usable ({retry.describe(exc)})"
            ) from None
        if self.options.until_end:
            self.ends = kafka_helpers.end_offsets(self.settings, self.topic)
            log.info("until-end: end offsets %s", self.ends)

    def _consumer_config(self) -> dict[str, object]:
        # "error": a position Kafka deleted meanwhile (retention) must not silently jump to the log start
        return membership.consumer_config(self.settings, self.membership, group=self.options.group,
                                          session_timeout_ms=int(self.options.session_timeout * 1000), **{
            **kafka_helpers.BULK_CONSUMER_TUNING,
            "client.id": f"kappa-archiver-{socket.gethostname()}-{os.getpid()}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "error",
            "enable.partition.eof": True,
            "queued.max.messages.kbytes": QUEUE_KBYTES,
            **self.commits.config(),
        })

    def _should_stop(self) -> bool:
        now = time.monotonic()
        if self.stop.is_set():
            return True
        if self.options.idle_exit is not None and now - self.last_activity >= self.options.idle_exit:
            log.info("idle for %.0fs: stopping", self.options.idle_exit)
            return True
        if self.options.until_end and self.assigned_once and self._all_at_end() and self._others_at_end(now):
            log.info("every partition reached the end offsets read at start: stopping")
            return True
        return False

    def _all_at_end(self) -> bool:
        return all(state.reached(self.ends.get(p, 0)) for p, state in self.parts.items())

    def _others_at_end(self, now: float) -> bool:
        """Partitions not assigned here count only once their S3 checkpoint reached the end: the member
        holding them may be gone (a stopped static member keeps its partitions for a session timeout),
        and --until-end must never report success with records left unarchived. Checked once a second."""
        if now < self.next_others_check:
            return False
        self.next_others_check = now + 1.0
        waiting = [p for p, end in self.ends.items() if end > 0 and p not in self.parts
                   and self._checkpointed(p) < end]
        if waiting and waiting != self.waiting_for:
            log.info("assigned partitions done; waiting for partitions %s (another member holds them)", waiting)
        self.waiting_for = waiting
        return not waiting

    def _checkpointed(self, partition: int) -> int:
        key = keys.archiver_checkpoint(self.topic, partition)
        try:
            body = s3_helpers.get_bytes(self.store.client, self.store.bucket, key)
        except retry.S3_ERRORS:
            return -1  # cannot tell now: keep waiting
        return -1 if body is None else archiver_checkpoint.from_json(body, self.topic, partition).next_offset

    # -- one iteration

    def _step(self, messages: list[Message]) -> None:
        now = time.monotonic()
        self._apply(self.flushes.done())
        self._reload_fenced()
        self._ingest(messages, now)
        self._start_flushes(self._due(now))
        self._pause_full(now)
        self._hold_back()
        self._report(now)

    def _due(self, now: float) -> list[int]:
        """Partitions over a threshold, plus the biggest buffers while all together exceed --max-buffer-bytes."""
        due = [p for p, state in self.parts.items() if state.due(self.options, now, self.ends.get(p))]
        total = self.flushes.bytes + sum(state.bytes for p, state in self.parts.items() if p not in due)
        for partition, state in sorted(self.parts.items(), key=lambda item: -item[1].bytes):
            if total <= self.options.max_buffer_bytes:
                break
            if partition not in due and state.records and not state.in_flight and not state.backoff.waiting(now):
                due.append(partition)
                total -= state.bytes
        return due

    def _ingest(self, messages: list[Message], now: float) -> None:
        """Append a consumed batch to the partition buffers; values are never looked at."""
        by_partition: dict[int, list[Message]] = {}
        errors = []
        for message in messages:
            if message.error() is None:
                by_partition.setdefault(message.partition(), []).append(message)
            else:
                errors.append(message)
        if errors:
            self._handle_errors(errors)
        if not by_partition:
            return
        self.last_activity = now
        consumed = 0
        for partition, records in by_partition.items():
            consumed += len(records)
            state = self.parts.get(partition)
            if state is not None:  # else: revoked meanwhile, the new owner reads it again
                # one frame per partition, built from its own messages: a slice of a shared batch
                # frame would keep the whole batch's value buffers alive until every partition
                # holding a slice has flushed, which defeats the buffer bounds
                state.add(archive_format.frame_from_messages(records, self.topic), now)
        self.summary.consumed += consumed
        self.metrics.consumed.inc(consumed)

    def _handle_errors(self, errors: Iterable[Message]) -> None:
        for message in errors:
            error = message.error()
            if error.code() == KafkaError._PARTITION_EOF:
                state = self.parts.get(message.partition())
                if state is not None:
                    state.eof = message.offset()
            elif error.code() == KafkaError._AUTO_OFFSET_RESET and message.partition() in self.parts:
                self._position_deleted(message.partition())
            elif error.fatal() or error.code() == KafkaError._FATAL:  # e.g. our instance id is still in use
                raise KafkaException(error)
            else:
                log.warning("consumer error (librdkafka retries): %s", error)

    # -- making buffers durable

    def _start_flushes(self, partitions: Iterable[int]) -> None:
        """Hand each partition's buffer to a flush thread, with the checkpoint ETag it must replace."""
        for partition in partitions:
            state = self.parts.get(partition)
            if state is None or not state.records or self.flushes.busy(partition):
                continue
            try:
                expected = self.store.expected(partition)
            except Fenced as exc:
                self._fenced(partition, state, exc)
                continue
            frames, records, size = state.detach()
            self.flushes.submit(partition, state, frames, records, size, lambda p=partition, f=frames, e=expected:
                                self.store.write(p, f, self.options.group, e, self.options.multipart_bytes))

    def _apply(self, jobs: Iterable[FlushJob[PartitionBuffer]]) -> list[int]:
        """Count, commit, back off or fence by each finished flush; returns the partitions that failed."""
        done, failed = [], []
        for job in jobs:
            state = self.parts.get(job.partition)
            if state is not job.owner:
                continue  # revoked, lost or fenced since: the partition's next owner starts from S3
            try:
                flushed = job.future.result()
            except retry.S3_ERRORS as exc:
                state.restore(job.frames, job.records, job.bytes)
                self._s3_failed(job.partition, state, exc)
                failed.append(job.partition)
            except Fenced as exc:
                self._fenced(job.partition, state, exc)
            else:
                done.append(TopicPartition(self.topic, job.partition, self._landed(job, state, flushed)))
        self._commit(done)
        return failed

    def _landed(self, job: FlushJob[PartitionBuffer], state: PartitionBuffer, flushed: Flushed) -> int:
        self.store.etags[job.partition] = flushed.etag
        self._count_flush(job.records, job.bytes, flushed.size, flushed.files)
        state.landed(flushed.next_offset)
        if state.paused:
            self._set_paused(job.partition, state, False)
        return flushed.next_offset

    def _pause_full(self, now: float) -> None:
        """A partition whose next buffer is due while its flush is still in flight stops fetching until
        that flush lands: per partition, at most one flush in flight and one more buffer (an outage
        or a slow S3 holds memory there, not in an ever-growing buffer)."""
        for partition, state in self.parts.items():
            if state.in_flight and state.records and not state.paused and state.over_threshold(self.options, now, None):
                self._set_paused(partition, state, True)

    def _hold_back(self) -> None:
        """Backpressure: while buffers and flights together exceed --max-buffer-bytes, wait for S3."""
        while self.flushes.jobs and not self.stop.is_set() and (
                self.flushes.bytes + sum(state.bytes for state in self.parts.values()) > self.options.max_buffer_bytes):
            self._apply(self.flushes.done(timeout=1.0))

    def _flush(self, partitions: Iterable[int]) -> list[int]:
        """Flush ``partitions`` now and wait (revoke, shutdown); returns those whose S3 write failed."""
        chosen = list(partitions)
        failed = self._apply(self.flushes.done(timeout=None, partitions=chosen))
        self._start_flushes(p for p in chosen if p not in failed)
        return failed + self._apply(self.flushes.done(timeout=None, partitions=chosen))

    def _fenced(self, partition: int, state: PartitionBuffer, exc: Fenced) -> None:
        """Another member checkpointed this partition: drop our buffer, never write it from here."""
        self.summary.fences += 1
        self.metrics.fences.inc()
        self.parts.pop(partition, None)
        self.store.forget(partition)
        self.refetch.add(partition)
        winner = "?"
        if exc.current is not None:
            current = archiver_checkpoint.from_json(exc.current, self.topic, partition)
            winner = f"{current.writer} at offset {current.next_offset}"
        log.warning("fenced: partition %d checkpointed by %s since we read it; %d buffered records (from offset "
                    "%s) dropped unwritten by %s:%d, re-reading the checkpoint if still assigned", partition, winner,
                    state.records, state.durable, socket.gethostname(), os.getpid())

    def _count_flush(self, records: int, bytes_in: int, bytes_written: int, files: int) -> None:
        summary = self.summary
        summary.records += records
        summary.bytes_in += bytes_in
        summary.bytes_written += bytes_written
        summary.files += files
        summary.checkpoints += 1
        self.metrics.records.inc(records)
        self.metrics.bytes_in.inc(bytes_in)
        self.metrics.bytes.inc(bytes_written)
        self.metrics.files.inc(files)

    def _s3_failed(self, partition: int, state: PartitionBuffer, exc: Exception) -> None:
        """Keep the buffer, stop fetching this partition, retry later with exponential backoff."""
        delay = state.backoff.failed(self.options.max_backoff)
        self._count_s3_error(exc)
        log.warning("S3 write for partition %d failed (%s); %d records kept, retry in %.1fs",
                    partition, retry.describe(exc), state.records, delay)
        if not state.paused:
            self._set_paused(partition, state, True)

    def _set_paused(self, partition: int, state: PartitionBuffer, paused: bool) -> None:
        if self.consumer is not None and not self.closing:
            tps = [TopicPartition(self.topic, partition)]
            self.consumer.pause(tps) if paused else self.consumer.resume(tps)
        state.paused = paused
        self.metrics.paused.set(sum(s.paused for s in self.parts.values()))

    def _commit(self, offsets: list[TopicPartition]) -> None:
        """Commit after the S3 checkpoint: informative for lag tools, never needed for correctness.

        Asynchronous (``kafka.OffsetCommits``): a synchronous commit during a rebalance waits for
        the rebalance, which waits for this member to poll. Failed commits go again, for the
        partitions still ours; the loop rejoins when one stays unanswered (``_check_commits``).
        """
        consumer = self.consumer
        if consumer is None or self.stuck is not None:
            return
        self.commits.send(consumer, offsets, owned=self.parts)

    def _check_commits(self) -> None:
        """After a consume(), which serves commit answers: an unanswered commit means a stuck coordinator."""
        if self.stuck is None:
            self.stuck = self.commits.overdue()

    def _drain(self, deadline: float, partitions: Iterable[int] | None = None) -> None:
        """Flush until nothing is buffered, retrying S3 with backoff until ``deadline``."""
        pending = [p for p in (self.parts if partitions is None else partitions) if p in self.parts]
        while True:
            pending = self._flush(pending)
            if not pending:
                return
            wait = min(state.backoff.retry_at for p, state in self.parts.items() if p in pending) - time.monotonic()
            if time.monotonic() + max(wait, 0) > deadline:
                records = sum(self.parts[p].records for p in pending)
                raise ArchiverError(
                    f"S3 stayed unavailable: {records} buffered records of partitions {pending} were not archived; "
                    "they stay in Kafka and the next archiver run resumes from the S3 checkpoint"
                )
            time.sleep(max(wait, 0))

    def _reload_fenced(self) -> None:
        """Fenced partitions still assigned here restart from the checkpoint the winner wrote."""
        if not self.refetch or self.consumer is None:
            return
        try:
            assigned = {tp.partition for tp in self.consumer.assignment()}
        except KafkaException:
            return
        for partition in sorted(self.refetch):
            self.refetch.discard(partition)
            if partition not in assigned:
                continue
            start = self._retry_s3(lambda p=partition: self.store.read_checkpoint(p), "read checkpoint")
            offset = OFFSET_BEGINNING if start is None else start
            try:
                self.consumer.seek(TopicPartition(self.topic, partition, offset))
                self.consumer.resume([TopicPartition(self.topic, partition)])  # it may have been paused by S3 errors
            except KafkaException as exc:
                log.warning("partition %d not re-read after the fence (%s)", partition, exc)
                continue
            self.parts[partition] = PartitionBuffer(durable=start, position=start)

    # -- rebalance callbacks (run inside consume())

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Seek every new partition to its S3 checkpoint (the durable resume point)."""
        if consumer is not self.consumer:
            return  # a replaced consumer, closing on another thread (see _rejoin)
        for tp in partitions:
            checkpoint = self._retry_s3(lambda p=tp.partition: self.store.read_checkpoint_doc(p), "read checkpoint")
            start = None if checkpoint is None else checkpoint.next_offset
            state = self.parts[tp.partition] = PartitionBuffer(durable=start, position=start)
            if checkpoint is not None and start is not None:
                self._check_same_topic(tp.partition, checkpoint)
                low = self._check_not_beyond_end(consumer, tp, start)
                if low is not None and start < low:
                    start = self._skip_or_refuse(tp.partition, state, start, low)
            tp.offset = OFFSET_BEGINNING if start is None else start
            self.refetch.discard(tp.partition)
        consumer.incremental_assign(partitions)
        refused = [tp for tp in partitions if self.parts[tp.partition].refused]
        consumer.resume([tp for tp in partitions if tp not in refused])
        if refused:
            consumer.pause(refused)
        self._count_refused()
        self.assigned_once = True
        log.info("assigned %s", {tp.partition: self.parts[tp.partition].durable for tp in partitions} or "nothing")

    def _check_same_topic(self, partition: int, checkpoint: ArchiverCheckpoint) -> None:
        """A checkpoint of another topic id means the topic was deleted and recreated: its offsets restart
        at 0, so archiving from the checkpoint would skip them and collide with archived offsets."""
        recorded = checkpoint.topic_id
        if recorded and self.store.topic_id and recorded != self.store.topic_id:
            raise ArchiverError(
                f"the S3 checkpoint of {self.topic}[{partition}] belongs to topic id {recorded}, but {self.topic} is "
                f"now topic id {self.store.topic_id}: the topic was recreated. Archive it under a new topic name or "
                f"move raw/{self.topic}/ and _state/archiver/{self.topic}/ aside"
            )

    def _skip_or_refuse(self, partition: int, state: PartitionBuffer, start: int, low: int) -> int:
        """Offsets start..low-1 were deleted by Kafka before we archived them: refuse, or skip if accepted."""
        if not self.options.accept_data_loss:
            state.refused = True
            message = (f"refusing to archive {self.topic}[{partition}]: Kafka deleted offsets {start}..{low - 1} "
                       f"({low - start} records) before they were archived (retention shorter than the outage?); "
                       "restart with --accept-data-loss to skip them")
            if self.options.until_end:
                raise ArchiverError(message)
            log.error(message)
            return start
        self.summary.skipped_offsets += low - start
        self.metrics.skipped.inc(low - start)
        log.warning("SKIPPED %s[%d] offsets %d..%d (%d records deleted by Kafka before they were archived; "
                    "--accept-data-loss)", self.topic, partition, start, low - 1, low - start)
        state.position = low
        return low

    def _position_deleted(self, partition: int) -> None:
        """Kafka deleted our fetch position while we ran (retention overtook us): refuse or skip as on assign."""
        assert self.consumer is not None
        state = self.parts[partition]
        tp = TopicPartition(self.topic, partition)
        low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
        position = state.position if state.position is not None else (state.durable or 0)
        if position >= low:
            raise ArchiverError(f"offset {position} of {self.topic}[{partition}] is out of range ({low}..{high}): "
                                "was the topic recreated or truncated?")
        start = self._skip_or_refuse(partition, state, position, low)
        if state.refused:
            self.consumer.pause([tp])
            self._count_refused()
        else:  # seek() refuses a partition in this error state ("Erroneous state"): assign it afresh
            self.consumer.incremental_unassign([tp])
            self.consumer.incremental_assign([TopicPartition(self.topic, partition, start)])

    def _count_refused(self) -> None:
        self.metrics.refused.set(sum(state.refused for state in self.parts.values()))

    def _check_not_beyond_end(self, consumer: Consumer, tp: TopicPartition, start: int) -> int | None:
        """A checkpoint past the log end means the topic was recreated (or lost data): offsets would
        collide with archived ones and readers would drop new records as duplicates, so refuse.
        Returns the log start offset (None if the broker cannot tell now)."""
        low, high = -1, -1
        for attempt in range(WATERMARK_CONFIRMATIONS):  # refuse only on an end that stays below the checkpoint
            if attempt:
                time.sleep(1.0)
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, tp.partition), timeout=10)
            except KafkaException:
                return None  # cannot tell now; librdkafka reports a real out-of-range later
            if start <= high:
                break
        if start > high:
            raise ArchiverError(
                f"the S3 checkpoint of {self.topic}[{tp.partition}] is at offset {start} but the partition ends at "
                f"{high}: was the topic recreated? Archive it under a new topic name or move raw/{self.topic}/ and "
                f"{keys.archiver_checkpoint(self.topic, tp.partition)} aside"
            )
        return low

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Flush, checkpoint and commit what we hold before another member takes over."""
        if consumer is not self.consumer:
            return
        owned = [tp.partition for tp in partitions if tp.partition in self.parts]
        if owned and not self.closing:
            try:
                self._drain(time.monotonic() + self.options.revoke_timeout, owned)
            except ArchiverError as exc:
                log.warning("revoked partitions not flushed: %s", exc)
        self._forget([tp.partition for tp in partitions])
        log.info("revoked %s", owned)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Fenced out: another member may own these already, so drop the buffers unwritten."""
        if consumer is not self.consumer:
            return
        dropped = self._forget([tp.partition for tp in partitions])
        log.warning("partitions lost (not written, re-read by their new owner): %s", dropped)

    def _forget(self, partitions: list[int]) -> dict[int, int]:
        """Drop what we hold of ``partitions`` unwritten; returns the records dropped per partition."""
        owned = [partition for partition in partitions if partition in self.parts]
        for job in self.flushes.done(timeout=None, partitions=owned):  # their outcome no longer counts
            if not job.future.cancelled() and isinstance(job.future.exception(), Fenced):
                log.warning("fenced: partition %d, a flush of %d records in flight when we lost it was refused by the "
                            "S3 checkpoint its new owner wrote", job.partition, job.records)
        dropped = {partition: self.parts.pop(partition).records for partition in owned}
        for partition in partitions:
            self.store.forget(partition)
            self.refetch.discard(partition)
        self._count_refused()
        return dropped

    def _retry_s3(self, call: Callable[[], T], what: str) -> T:
        """Retry an S3 call until it works or the archiver is stopped (no deadline: nothing is buffered)."""
        return retry.call_s3(call, what, give_up_s=None, stop=self.stop, cap=self.options.max_backoff,
                             on_error=self._count_s3_error, logger=log)

    def _count_s3_error(self, _exc: Exception) -> None:
        self.summary.s3_errors += 1
        self.metrics.s3_errors.inc()

    # -- observability

    def _report(self, now: float, force: bool = False) -> None:
        """One log line with the counters, and the lag gauges, every ``log_interval`` seconds."""
        if not force and now - self.last_report < self.options.log_interval:
            return
        self.last_report = now
        lag = self._lag()
        buffered = sum(state.records + state.in_flight for state in self.parts.values())
        self.metrics.buffered.set(buffered)
        paused = sorted(p for p, state in self.parts.items() if state.paused)
        s = self.summary
        log.info(
            "records=%d consumed=%d bytes_in=%d bytes_written=%d files=%d lag=%s buffered=%d partitions=%s paused=%s "
            "s3_errors=%d", s.records, s.consumed, s.bytes_in, s.bytes_written, s.files,
            sum(lag.values()) if lag else "?", buffered, sorted(self.parts), paused, s.s3_errors,
        )

    def _lag(self) -> dict[int, int]:
        """Per partition: cached high watermark minus the durable offset (no broker round trip)."""
        lag: dict[int, int] = {}
        if self.consumer is None or self.closing:
            return lag
        for partition, state in self.parts.items():
            try:
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, partition), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                lag[partition] = max(0, high - (state.durable or 0))
                self.metrics.lag.labels(partition=str(partition)).set(lag[partition])
        return lag


def run_archiver(settings: Settings, options: ArchiverOptions = ArchiverOptions(),
                 stop: threading.Event | None = None) -> ArchiverSummary:
    """Run one archiver group member until ``stop`` is set, ``--until-end`` or ``--idle-exit``."""
    return Archiver(settings, options, stop).run()
