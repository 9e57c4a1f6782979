"""The one stream processor, live or bounded (replay): the same code path, only topic, group and stop differ.

Because replay runs this very program, a corrected report means "what live would have said with the
fixed code". Modes, start positions, the DLQ and the checkpoint order: docs/ARCHITECTURE.md, "The processor".
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat
from operator import is_not, itemgetter
from typing import Any, Literal

import polars as pl
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as TP

from workers import kafka as kafka_helpers
from workers import keys, membership, retry
from workers.config import Settings
from workers.errors import KappaError
from workers.perf import gc_paused
from workers.pipelines import get_pipeline
from workers.pipelines.base import (
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    REJECT,
    WINDOW_MS,
    FrameT,
    Pipeline,
    reject_missing_timestamp,
)
from workers.processor import handoff as handoff_lib
from workers.processor.progress import NoProgress, Progress
from workers.processor.state import (
    PartitionState,
    StateStore,
    day_of,
    day_stats,
    list_states,
    results_for_day,
    to_parquet,
)
from workers.reports import stats as report_stats
from workers.s3 import Fenced, ensure_bucket, get_bytes, put_if, s3_client

log = logging.getLogger("kappa.processor")

LIVE_GRACE_MS = 60_000
#: the DLQ producer accepts what the input topic accepted (librdkafka's 1 MB default would reject big
#: bad records); a copy the DLQ broker still refuses is re-sent without its value (see ``delivered``)
DLQ_PRODUCER_CONFIG = {"enable.idempotence": True, "linger.ms": 20, "message.max.bytes": 64 * 1024 * 1024}
TRUNCATED_HEADER = "kappa.dlq.truncated"
#: the record's own timestamp when the DLQ copy had to take the broker's time instead
ORIGINAL_TIMESTAMP_HEADER = "kappa.dlq.timestamp"
#: the late topic's headers (besides the record's own): where it came from, the window it missed
#: and the watermark it was compared against; (partition, offset) lets a reader drop re-sends
LATE_HEADERS = ("kappa.late.topic", "kappa.late.partition", "kappa.late.offset", "kappa.late.window_start",
                "kappa.late.window_end", "kappa.late.watermark", "kappa.late.pipeline")
#: per record of a classified frame: the watermark (earlier valid records' max timestamp - grace) it met
WATERMARK_MS = "_watermark_ms"
DEFAULT_BATCH_SIZE = 20_000
#: how the processor reads: bulk fetches, only committed transactions (a replay load or stage 1 that
#: aborted is never counted), an EOF per partition (a bounded run's end, positions past markers)
READ_TUNING: dict[str, object] = {
    **kafka_helpers.BULK_CONSUMER_TUNING,
    "enable.partition.eof": True,
    "isolation.level": "read_committed",
}
DAY_MS = 86_400_000
DEFAULT_CHECKPOINT_SECONDS = 5.0
#: classic protocol only (KIP-848 keeps it on the broker); a static member restarted within it
#: gets its partitions back at once, a dead one's move to the others after it
DEFAULT_SESSION_TIMEOUT_S = 10.0
#: a requested stop's last checkpoint waits this long for the dead-letter and late records at most:
#: during a Kafka outage a supervisor (systemd, Kubernetes, Ctrl-C) must not wait out a retry window
STOP_FLUSH_S = 5.0
#: a checkpoint waits this long for its dead-letter and late records, then is deferred to the next
#: one (``DlqNotFlushed``): a Kafka outage pauses checkpoints instead of ending the worker
CHECKPOINT_FLUSH_S = 10.0
#: a finished bounded run's last checkpoint, which its reports wait for, waits longer
FINAL_FLUSH_S = 60.0
#: a requested stop closes the consumer within this: its last checkpoint is written already, so the
#: close only hands the partitions over; during a Kafka outage it waited 45 s (``kafka.CLOSE_LIMIT_S``)
#: for answers nobody sends (librdkafka's close waits up to session.timeout.ms for an unavailable
#: coordinator, and up to socket.timeout.ms for final commits: librdkafka#625, #1002), and the group
#: notices an abandoned member at its session timeout anyway
STOP_CLOSE_S = 15.0
NEVER = -(2**62)
ALWAYS = 2**62
Start = Literal["earliest", "latest"]


class DlqNotFlushed(KappaError):
    """The checkpoint's dead-letter or late records are not all delivered yet (none failed): the
    checkpoint waits for a later try, its records are still uncounted, nothing is lost."""


@dataclass
class RunSummary:
    """What a run did; bounded runs also name the reports written (sent to Dagster as a custom message)."""

    pipeline: str
    version: int
    topic: str
    group: str
    bounded: bool
    complete: bool = False
    records: int = 0
    dlq_records: int = 0
    late_records: int = 0
    #: commits refused because another member committed the partition since we loaded it (S3 fence)
    fenced_commits: int = 0
    seconds: float = 0.0
    end_offsets: dict[int, int] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    stats_files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["end_offsets"] = {str(p): o for p, o in self.end_offsets.items()}
        return data


@dataclass
class Batch:
    """One consume() result split into records (as a frame + the messages, for the DLQ) and EOFs."""

    messages: list[Any]
    frame: pl.DataFrame
    eofs: list[tuple[int, int]]


def split_batch(messages: Sequence[Any], pipeline: Pipeline) -> Batch:
    """The only per-message Python work: pull four fields, then parse all values in one call.

    The fields are read with ``map`` over the unbound methods (no bound method per call): on a
    million records that is a tenth of the processor's own time."""
    records, eofs = messages, []
    if any(map(is_not, map(Message.error, messages), repeat(None))):  # (KafkaError's == refuses None)
        records = []
        for message in messages:
            error = message.error()
            if error is None:
                records.append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                eofs.append((message.partition(), message.offset()))
            else:
                raise KafkaException(error)
    meta = pl.DataFrame(
        {
            "partition": list(map(Message.partition, records)),
            "offset": list(map(Message.offset, records)),
            "timestamp_ms": list(map(itemgetter(1), map(Message.timestamp, records))),
            "idx": range(len(records)),
        },
        schema={"partition": pl.Int32, "offset": pl.Int64, "timestamp_ms": pl.Int64, "idx": pl.Int64},
    )
    parsed = pipeline.parse(list(map(Message.value, records)))
    frame = pl.concat([meta, parsed], how="horizontal").with_columns(reject_missing_timestamp())
    return Batch(list(records), frame, eofs)


def classify(frame: pl.DataFrame, state: PartitionState) -> pl.DataFrame:
    """Add ``outcome`` (counted/dlq/late/duplicates) per record, in offset order, batch-size independent.

    A record is late when its window had already closed before it arrived: window end <= (max
    timestamp of the partition's earlier records) - grace.
    """
    pipeline = state.pipeline
    frame = pipeline.with_window(frame)
    floor = NEVER if state.max_ts is None else state.max_ts
    # only valid records move the watermark: a malformed record stamped an hour ahead must not make
    # the next hour of good records late
    valid_ts = pl.when(pl.col(REJECT).is_null()).then(pl.col("timestamp_ms")).otherwise(pl.lit(floor))
    previous_max = pl.max_horizontal(valid_ts.cum_max().shift(1, fill_value=floor), pl.lit(floor))
    watermark = pl.lit(None, pl.Int64) if state.grace_ms is None else previous_max - state.grace_ms
    late = pl.col(WINDOW_MS) + pipeline.window_ms <= watermark
    outcome = pl.when(pl.col(REJECT).is_not_null()).then(pl.lit("dlq")).when(late).then(pl.lit("late"))
    frame = frame.with_columns(watermark.alias(WATERMARK_MS), outcome.otherwise(pl.lit("counted")).alias("outcome"))
    return mark_duplicates(frame, state) if pipeline.dedup_by else frame


def mark_duplicates(frame: pl.DataFrame, state: PartitionState) -> pl.DataFrame:
    """A counted record whose (window, dedup_by) was already counted, here or before, is a duplicate."""
    key = [WINDOW_MS, *state.pipeline.dedup_by]
    candidates = frame.filter(pl.col("outcome") == "counted").with_columns(
        pl.struct(key).is_first_distinct().alias("_first")
    )
    seen = state.seen.cast({c: frame.schema[c] for c in key}).with_columns(pl.lit(True).alias("_seen"))  # type: ignore[arg-type]
    candidates = candidates.join(seen, on=key, how="left")
    duplicates = candidates.filter(~pl.col("_first") | pl.col("_seen").is_not_null())["offset"]
    return frame.with_columns(
        pl.when(pl.col("offset").is_in(duplicates.implode()))
        .then(pl.lit("duplicates"))
        .otherwise(pl.col("outcome"))
        .alias("outcome")
    )


def apply(frame: pl.DataFrame, state: PartitionState) -> pl.DataFrame:
    """Fold one partition's records (offset order, all >= next_offset) into its state; returns them classified.

    What the fold derives from the classified records (open partials, dedup keys, day counts, the new
    timestamp and offset bounds) is one set of plans collected together on polars' in-memory engine:
    as separate eager steps (or on polars 2's default streaming engine) their fixed cost per call was
    a fifth of the processor's CPU, and a batch brings one partition's slice of only a few thousand rows.
    """
    pipeline = state.pipeline
    frame = classify(frame, state)
    rows = frame.lazy()
    plans = {
        "per_day": day_counts(rows),
        "bounds": rows.select(
            pl.col("timestamp_ms").filter(pl.col("outcome") != "dlq").max().alias("max_ts"),
            pl.col("offset").max().alias("last_offset"),
        ),
    }
    if (frame["outcome"] == "counted").any():
        counted = rows.filter(pl.col("outcome") == "counted")
        plans["open"] = lazy_fold(pipeline, state.open, counted)
        if pipeline.dedup_by:
            seen = counted.select(WINDOW_MS, *pipeline.dedup_by).cast(state.seen.schema)  # type: ignore[arg-type]
            plans["seen"] = pl.concat([state.seen.lazy(), seen])
    folded = dict(zip(plans, pl.collect_all(plans.values(), engine="in-memory"), strict=True))
    state.open = folded.get("open", state.open)
    state.seen = folded.get("seen", state.seen)
    state.add_stats(folded["per_day"])
    batch_max, last_offset = folded["bounds"].row(0)
    if batch_max is not None:
        state.max_ts = batch_max if state.max_ts is None else max(state.max_ts, batch_max)
    state.next_offset = last_offset + 1
    state.dirty = True
    state.close_windows(state.watermark())
    return frame


def lazy_fold(pipeline: Pipeline, open_partials: pl.DataFrame, counted: pl.LazyFrame) -> pl.LazyFrame:
    """The plan of the open partials with ``counted`` merged in; a pipeline written for eager frames
    only (``.height``, ``frame["col"]``) fails here with what to change, not with polars' traceback."""
    try:
        return pipeline.merge(pl.concat([open_partials.lazy(), pipeline.aggregate(counted)]))
    except (AttributeError, TypeError) as exc:
        raise KappaError(f"pipeline {pipeline.label}: aggregate() and merge() must accept a polars LazyFrame "
                         f"(use methods DataFrame and LazyFrame share, see FrameT): {exc}") from None


def day_counts(frame: FrameT) -> FrameT:
    """Outcomes per UTC day; a record whose timestamp has no calendar day (DLQ'd) belongs to no day."""
    in_range = frame.filter(pl.col("timestamp_ms").is_between(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS))
    # grouped by day number, named after: a date string per record cost more than the grouping
    per_day = in_range.group_by((pl.col("timestamp_ms") // DAY_MS).alias("day"), "outcome").len()
    return per_day.with_columns(day_of(pl.col("day") * DAY_MS)).sort("day", "outcome")  # type: ignore[return-value]


class Processor:
    """One run of the processor; see the module docstring for the contract."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        *,
        topic: str,
        group: str,
        bounded: bool,
        start: Start,
        start_offsets: Mapping[int, int] | None,
        end_offsets: Mapping[int, int] | None,
        grace_ms: int | None,
        batch_size: int,
        checkpoint_seconds: float,
        dlq_topic: str,
        late_topic: str,
        progress: Progress,
        stop: threading.Event,
        switch: handoff_lib.Switch | None = None,
        instance_id: str | None = None,
        group_protocol: str | None = None,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT_S,
        commit_timeout: float = kafka_helpers.COMMIT_LIMIT_S,
    ) -> None:
        self.settings, self.pipeline = settings, pipeline
        self.commit_timeout = commit_timeout
        self.topic, self.group, self.bounded, self.start = topic, group, bounded, start
        self.start_offsets = dict(start_offsets or {})
        if switch is None and self.start_offsets and not bounded:
            switch = handoff_lib.Switch(self.start_offsets, {})
        self.switch = switch
        self.requested_end = dict(end_offsets) if end_offsets is not None else None
        self.grace_ms, self.batch_size, self.checkpoint_seconds = grace_ms, batch_size, checkpoint_seconds
        self.budget = kafka_helpers.ConsumeBudget(batch_size)
        self.dlq_topic, self.late_topic, self.progress, self.stop = dlq_topic, late_topic, progress, stop
        self.instance_id, self.group_protocol, self.session_timeout = instance_id, group_protocol, session_timeout
        self.client = s3_client(settings)
        self.prefix = keys.processor_prefix(pipeline.name, pipeline.version, group if bounded else None)
        self.store = StateStore(self.client, settings.s3_bucket, self.prefix, writer=uuid.uuid4().hex[:10])
        self.states: dict[int, PartitionState] = {}
        #: partitions whose commit was fenced: reloaded from S3 by the loop (never inside a callback)
        self.refetch: set[int] = set()
        self.end: dict[int, int] = {}
        self.summary = RunSummary(pipeline.name, pipeline.version, topic, group, bounded)
        self.delivery_errors: list[str] = []
        self.last_checkpoint = self.last_global_check = self.last_lag = 0.0
        #: S3 failures are waited out with consumption paused (``workers.retry``) instead of crashing
        self.s3_backoff = retry.Backoff()
        self.lag: int | None = None
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self.membership = membership.Membership()
        #: set when the run dies of an unexpected error: state in memory may be half applied, so the
        #: revoke that ``close()`` triggers must not checkpoint it (the last checkpoint stands)
        self.crashed = False
        #: live, before the first assignment: was there no checkpoint at all (see :meth:`unknown_start`)
        self.fresh_group: bool | None = None
        self.self_fenced = membership.SelfFenceBudget()
        self.unanswered = membership.UnansweredBudget()
        #: the current consumer's offset commits: a replaced consumer's unconfirmed ones carry over
        self.commits = kafka_helpers.OffsetCommits(topic, commit_timeout)

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> RunSummary:
        started = time.monotonic()
        ensure_bucket(self.client, self.settings.s3_bucket)
        partitions = kafka_helpers.partition_count(self.settings, self.topic)
        kafka_helpers.ensure_topic(self.settings, self.dlq_topic, partitions)
        kafka_helpers.ensure_topic(self.settings, self.late_topic, partitions)
        if self.bounded:
            self.end = self.bounded_end_offsets(partitions)
            self.summary.end_offsets = dict(self.end)
        elif self.switch is not None and handoff_lib.claim_live_prefix(
            self.client, self.settings.s3_bucket, self.prefix, self.switch.origin
        ):
            log.warning("explicit start offsets win: removed the older checkpoint under %s", self.prefix)
        self.producer = Producer(self.settings.kafka_config(**DLQ_PRODUCER_CONFIG))
        self.membership = membership.resolve("processor", self.group, self.instance_id, self.group_protocol)
        log.info("joining group %s as %s (protocol %s)", self.group,
                 self.membership.instance_id or "a dynamic member", self.membership.protocol)
        self.consumer = Consumer(self.consumer_config())
        self.consumer.subscribe([self.topic], on_assign=self.on_assign, on_revoke=self.on_revoke, on_lost=self.on_lost)
        self.last_checkpoint = time.monotonic()
        try:
            self.loop()
            if self.summary.complete:
                self.retry_s3(lambda: self.checkpoint(flush_timeout=FINAL_FLUSH_S), "final checkpoint")
            else:
                self.checkpoint_on_stop()
        except BaseException:
            self.crashed = True
            raise
        finally:
            kafka_helpers.close_within(self.consumer, self.close_limit())  # its revoke callback runs
            self.membership.release()
            self.progress.update(self.summary.records, self.lag, self.summary.late_records, force=True)
            self.progress.close()
        if self.summary.complete:
            self.retry_s3(self.write_reports, "report write")
        self.summary.seconds = round(time.monotonic() - started, 3)
        return self.summary

    def checkpoint_on_stop(self) -> None:
        """A requested stop saves what it can in one bounded try, without retry windows (its DLQ
        flush waits ``STOP_FLUSH_S``, see ``flush_dlq``): what an outage keeps it from writing is
        redone by the next run from the last checkpoint (S3 stays the truth; an unwritten state
        leaves its records uncounted, never lost)."""
        try:
            self.checkpoint()
        except (KappaError, KafkaException, *retry.S3_ERRORS) as exc:
            log.warning("stopping: the last checkpoint is not complete (%s); the next run redoes the work since "
                        "the last one that is", retry.describe(exc) if isinstance(exc, retry.S3_ERRORS) else exc)

    def close_limit(self) -> float:
        """How long the last ``close()`` may take: shorter after a requested stop (see ``STOP_CLOSE_S``)."""
        return STOP_CLOSE_S if self.stop.is_set() and not self.summary.complete else kafka_helpers.CLOSE_LIMIT_S

    def rejoin(self, error: KafkaError) -> None:
        """Our static member was fenced by our own re-join (see ``membership.SelfFenceBudget``), or
        the group coordinator does not answer (``membership.UnansweredBudget``): drop the uncommitted
        state unwritten (as on_lost) and join again with a new consumer, same id."""
        cause = membership.rejoin_cause(error)
        log.warning("group %s %s (%s): uncommitted state dropped, rejoining", self.group, cause, error.str())
        self.states.clear()
        self.refetch.clear()
        self.replace_consumer()

    def replace_consumer(self) -> None:
        """Close the consumer, bounded (a coordinator that does not answer can hold close(): then it is
        abandoned), and subscribe a new one; the old one's callbacks see it is no longer ours."""
        old, self.consumer = self.consumer, None
        kafka_helpers.close_within(old)
        self.commits = kafka_helpers.OffsetCommits(self.topic, self.commit_timeout, carried=self.commits.pending())
        self.consumer = Consumer(self.consumer_config())
        self.consumer.subscribe([self.topic], on_assign=self.on_assign, on_revoke=self.on_revoke, on_lost=self.on_lost)

    def consumer_config(self) -> dict[str, object]:
        # auto.offset.reset "earliest": a partition without any start position is a new partition
        # (``--start latest`` is applied explicitly, see unknown_start), never skipped
        return membership.consumer_config(
            self.settings,
            self.membership,
            group=self.group,
            session_timeout_ms=int(self.session_timeout * 1000),
            # eager: a rolling upgrade must not mix protocols in one group (INCONSISTENT_GROUP_PROTOCOL)
            assignment_strategy="range",
            **{
                **READ_TUNING,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                **self.commits.config(),
            },
        )

    def consume_step(self, timeout: float) -> bool:
        """Consume and process one batch; False when the member was self-fenced and rejoined instead."""
        assert self.consumer is not None
        with gc_paused():  # consume + process allocate only acyclic per-record objects
            try:  # consume() too: it raises what a rebalance callback raised (e.g. a fenced committed())
                self.consume_batch(timeout)
            except KafkaException as exc:
                self.rejoin_or_raise(exc)
                return False
        return True

    def consume_batch(self, timeout: float) -> None:
        """A function of its own so the messages are freed before the collector resumes (see gc_paused)."""
        assert self.consumer is not None
        messages = self.consumer.consume(num_messages=self.messages_wanted(), timeout=timeout)
        self.budget.observe(messages)
        if messages:
            self.process(messages)

    def messages_wanted(self) -> int:
        """The budget's count; bounded, no more than the records left: ``consume()`` waits out its
        whole timeout for messages that never come (0.5 s at the end of a bounded run, 15 % of 1M)."""
        wanted, left = self.budget.messages(), self.records_left()
        return wanted if not left else min(wanted, left)

    def records_left(self) -> int | None:
        """Records between our positions and the end offsets; None when unknown (or not bounded)."""
        if not self.bounded or not self.states:
            return None
        left = 0
        for partition, state in self.states.items():
            if state.finalized:
                continue
            if state.next_offset is None:
                return None
            left += max(0, self.end[partition] - state.next_offset)
        return left

    def rejoin_or_raise(self, exc: KafkaException) -> None:
        """Rejoin with new clients, within its budget, where librdkafka reports our static member
        fenced (a consume() error, or the bare fatal error of any later consumer call) or a group
        call still timed out after its retries (a stuck coordinator connection); anything else
        propagates."""
        error, now = exc.args[0], time.monotonic()
        static = self.membership.instance_id is not None
        if not (self.self_fenced.allows(error, now, static=static) or self.unanswered.allows(error, now)):
            raise exc
        if self.stop.is_set():  # a stop is final: no new clients, the loop ends
            self.stop_instead_of_rejoining(error)
            return
        self.rejoin(error)

    def stop_instead_of_rejoining(self, error: KafkaError) -> None:
        log.warning("group %s %s (%s) while stopping: uncommitted state dropped, not rejoining", self.group,
                    membership.rejoin_cause(error), error.str())
        self.states.clear()

    def loop(self) -> None:
        assert self.consumer is not None
        while not self.stop.is_set():
            if not self.consume_step(timeout=0.5):
                continue
            if self.s3_backoff.waiting(time.monotonic()):
                continue  # S3 is failing: partitions are paused until the next try
            try:
                finished = self.durable_step()
            except retry.S3_ERRORS as exc:
                self.s3_failed(exc)
                continue
            except DlqNotFlushed as exc:
                log.warning("checkpoint deferred: %s", exc)
                continue
            except KafkaException as exc:
                self.rejoin_or_raise(exc)
                continue
            self.s3_recovered()
            if finished:
                self.summary.complete = True
                return

    def durable_step(self) -> bool:
        """Checkpoint when due (or when S3 just failed), report progress; True once a bounded run is done."""
        # bounded: once every assigned partition is finalized, checkpoint now instead of idling
        # up to checkpoint_seconds before finished() can see it
        self.reload_fenced()
        done = self.bounded and bool(self.states) and all(s.finalized for s in self.states.values())
        if done or self.s3_backoff.failing or time.monotonic() - self.last_checkpoint >= self.checkpoint_seconds:
            self.checkpoint()
        self.report_progress()
        return self.bounded and self.finished()

    # ---------------------------------------------------------------- S3 outages

    def s3_failed(self, exc: Exception) -> None:
        """Stop fetching (memory stays bounded) and retry later; the last durable checkpoint still stands."""
        assert self.consumer is not None
        delay = self.s3_backoff.failed()
        with contextlib.suppress(KafkaException):
            self.consumer.pause(self.consumer.assignment())
        log.warning("S3 failed (%s); consumption paused, retry in %.1fs", retry.describe(exc), delay)

    def s3_recovered(self) -> None:
        if not self.s3_backoff.failing:
            return
        assert self.consumer is not None
        self.s3_backoff.reset()
        resume = [TP(self.topic, p) for p, s in self.states.items() if not s.finalized]
        with contextlib.suppress(KafkaException):
            self.consumer.resume(resume)
        log.warning("S3 answers again; consumption resumed")

    def retry_s3(self, call: Any, what: str) -> None:
        """Retry ``call`` through an S3 outage for up to ``retry.GIVE_UP_S``, then fail with one clear line."""
        retry.call_s3(call, what, logger=log)

    # ---------------------------------------------------------------- rebalance

    def on_assign(self, consumer: Consumer, partitions: list[TP]) -> None:
        if consumer is not self.consumer:
            return  # a replaced consumer, closing on another thread (see rejoin)
        for tp in partitions:
            state = self.store.load(self.new_state(tp.partition))
            self.states[tp.partition] = state
            self.refetch.discard(tp.partition)
            tp.offset = self.start_offset(state)
            if tp.offset == OFFSET_STORED:
                tp.offset = self.unknown_start()
        self.fresh_group = False  # partitions assigned from now on are new ones: earliest
        log.info("assigned %s", {tp.partition: tp.offset for tp in partitions})
        if self.membership.protocol == "consumer":  # KIP-848 assignments are always incremental
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        self.pause_finished()

    def unknown_start(self) -> int:
        """Start of a partition with no checkpoint and no explicit offset.

        ``--start latest`` applies to the partitions of a live group's very first assignment (the
        group has no checkpoint at all); a partition that appears later was added to the topic after
        the group started, so all of it is new: it starts at the committed offset, else the earliest
        (``auto.offset.reset``), never at the end.
        """
        if self.bounded or self.start != "latest":
            return OFFSET_STORED
        if self.fresh_group is None:
            self.fresh_group = not list_states(self.client, self.settings.s3_bucket, self.prefix)
        return OFFSET_END if self.fresh_group else OFFSET_STORED

    def on_revoke(self, consumer: Consumer, partitions: list[TP]) -> None:
        """Hand over cleanly: checkpoint what we have, then forget it (not after a crash: see ``crashed``)."""
        if consumer is not self.consumer:
            return
        revoked = {tp.partition for tp in partitions}
        try:
            if not self.crashed:
                self.checkpoint(revoked)
        except retry.S3_ERRORS as exc:  # the new owner resumes from the last durable checkpoint: nothing lost
            log.warning("handing over %s without a checkpoint (S3: %s)", sorted(revoked), type(exc).__name__)
        except DlqNotFlushed as exc:  # the same; a dead-letter record delivered later is a re-send (at least once)
            log.warning("handing over %s without a checkpoint (%s)", sorted(revoked), exc)
        for partition in revoked:
            self.states.pop(partition, None)
        self.refetch -= revoked
        log.info("revoked %s", sorted(revoked))

    def on_lost(self, consumer: Consumer, partitions: list[TP]) -> None:
        """Someone else owns these now (our session expired): our uncommitted work is void."""
        if consumer is not self.consumer:
            return
        lost = sorted(tp.partition for tp in partitions)
        for partition in lost:
            self.states.pop(partition, None)
        self.refetch -= set(lost)
        log.warning("partitions %s of %s lost (session expired): uncommitted state dropped unwritten, "
                    "their new owner resumes from S3%s", lost, self.group, "" if self.stop.is_set() else "; rejoining")

    def new_state(self, partition: int) -> PartitionState:
        return PartitionState(self.pipeline, self.topic, self.group, partition, self.grace_ms)

    def start_offset(self, state: PartitionState) -> int:
        """S3 checkpoint > explicit start offset > (bounded from-beginning: 0) > committed/auto reset."""
        if state.next_offset is not None:
            return state.next_offset
        if state.partition in self.start_offsets:
            return self.start_offsets[state.partition]
        if self.bounded and self.start == "earliest":
            return OFFSET_BEGINNING
        return OFFSET_STORED

    def reload_fenced(self) -> None:
        """Partitions fenced and still assigned here: adopt what the winner committed, continue from it."""
        assert self.consumer is not None
        if not self.refetch:
            return
        try:
            assigned = {tp.partition for tp in self.consumer.assignment()}
        except KafkaException:
            return  # retried at the next step
        for partition in sorted(self.refetch):
            if partition in assigned:
                self.reload(partition)
            self.refetch.discard(partition)

    def reload(self, partition: int) -> None:
        """Load the committed state and seek to its offset; the state is used only once the seek worked."""
        assert self.consumer is not None
        state = self.store.load(self.new_state(partition))
        try:
            self.consumer.seek(TP(self.topic, partition, self.start_offset(state)))
            if not state.finalized:  # it may have been paused by an S3 outage
                self.consumer.resume([TP(self.topic, partition)])
        except KafkaException as exc:  # not fetchable here (any more): a rebalance hands it out again
            log.warning("partition %d not reloaded after the fence (%s)", partition, exc)
            return
        self.states[partition] = state
        self.pause_finished()

    # ---------------------------------------------------------------- processing

    def process(self, messages: Sequence[Any]) -> None:
        batch = split_batch(messages, self.pipeline)
        if batch.frame.height:
            for (partition,), frame in batch.frame.partition_by("partition", as_dict=True).items():
                state = self.states.get(partition)  # type: ignore[call-overload]
                if state is not None and not state.finalized:
                    self.process_partition(state, frame, batch.messages)
        for partition, offset in batch.eofs:
            self.on_eof(partition, offset)
        if self.bounded:
            for state in self.states.values():
                self.finalize_if_done(state)

    def process_partition(self, state: PartitionState, frame: pl.DataFrame, messages: list[Any]) -> None:
        if state.next_offset is not None and frame["offset"].min() < state.next_offset:  # type: ignore[operator]
            frame = frame.filter(pl.col("offset") >= state.next_offset)
        if self.bounded and frame.height:
            end = self.end[state.partition]
            if frame["offset"].max() >= end:  # type: ignore[operator]
                state.next_offset, state.dirty = end, True
                frame = frame.filter(pl.col("offset") < end)
        if self.switch is not None and self.switch.covered:
            # handoff: a promoted day's corrected report counts these (EOF still moves the position past them)
            covered = self.switch.covered_rows(state.partition, day_of(pl.col("timestamp_ms")), pl.col("offset"))
            frame = frame.filter(~covered)
        if frame.height == 0:
            return
        frame = apply(frame, state)
        outcomes = frame["outcome"]
        late = int((outcomes == "late").sum())
        self.summary.records += frame.height
        self.summary.late_records += late
        if (outcomes == "dlq").any():
            self.send_to_dlq(frame.filter(pl.col("outcome") == "dlq"), messages)
        if late:
            self.send_late(frame.filter(pl.col("outcome") == "late"), messages)

    def on_eof(self, partition: int, offset: int) -> None:
        """At the end of a partition our position is ``offset`` (covers transaction markers too)."""
        state = self.states.get(partition)
        if state is None or state.finalized:
            return
        if self.bounded:
            offset = min(offset, self.end[partition])
        if state.next_offset is None or offset > state.next_offset:
            state.next_offset, state.dirty = offset, True

    def finalize_if_done(self, state: PartitionState) -> None:
        """Bounded: once a partition reached its end offset, close every window and stop fetching it."""
        end = self.end[state.partition]
        if state.finalized or state.next_offset is None or state.next_offset < end:
            return
        state.close_windows(ALWAYS)
        state.finalized, state.end_offset, state.dirty = True, end, True
        self.pause_finished()

    def pause_finished(self) -> None:
        assert self.consumer is not None
        done = [TP(self.topic, p) for p, s in self.states.items() if s.finalized]
        if done:
            self.consumer.pause(done)

    # ---------------------------------------------------------------- DLQ

    def send_to_dlq(self, rejects: pl.DataFrame, messages: list[Any]) -> None:
        """Original key/value/headers/timestamp + reason headers; flushed before the next checkpoint."""
        assert self.producer is not None
        label = self.pipeline.label.encode()
        for idx, offset, reason in rejects.select("idx", "offset", REJECT).iter_rows():
            message = messages[idx]
            headers = [
                *(message.headers() or []),
                ("kappa.dlq.reason", reason.encode()),
                ("kappa.dlq.topic", self.topic.encode()),
                ("kappa.dlq.partition", str(message.partition()).encode()),
                ("kappa.dlq.offset", str(offset).encode()),
                ("kappa.dlq.pipeline", label),
            ]
            timestamp = message.timestamp()[1]
            if timestamp > MAX_TIMESTAMP_MS:  # the DLQ topic may refuse what the input topic accepted
                headers.append(original_timestamp_header(timestamp))
            usable = 0 < timestamp <= MAX_TIMESTAMP_MS
            self.produce_side(self.dlq_topic, message.key(), message.value(), headers, timestamp if usable else 0)
        self.summary.dlq_records += rejects.height

    def send_late(self, late: pl.DataFrame, messages: list[Any]) -> None:
        """Records later than grace, byte-exact, to the late topic: same producer and flush as the DLQ."""
        for idx, offset, window, watermark in late.select("idx", "offset", WINDOW_MS, WATERMARK_MS).iter_rows():
            message = messages[idx]
            stamped = late_headers(self.pipeline, self.topic, message.partition(), offset, window, watermark)
            headers = [*(message.headers() or []), *stamped]
            self.produce_side(self.late_topic, message.key(), message.value(), headers, message.timestamp()[1])

    def produce_side(self, topic: str, key: bytes | None, value: bytes | None, headers: list, timestamp: int) -> None:
        """Produce to the DLQ or the late topic; too big for the broker: the value is dropped (see ``delivered``)."""
        assert self.producer is not None
        while True:
            try:
                self.producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=headers,
                    timestamp=timestamp,
                    on_delivery=self.delivered,
                )
                break
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE or value is None:
                    raise
                key, value, headers = key, None, [*headers, truncated_header(len(value))]
        self.producer.poll(0)

    def delivered(self, error: KafkaError | None, message: Any) -> None:
        if error is None:
            return
        if error.code() == KafkaError.MSG_SIZE_TOO_LARGE and message.value() is not None:
            # too big for the DLQ topic: keep key, headers and reason, drop the value (the raw archive has it)
            headers = [*(message.headers() or []), truncated_header(len(message.value()))]
            self.produce_side(message.topic(), message.key(), None, headers, message.timestamp()[1])
            return
        headers = message.headers() or []
        if error.code() in (KafkaError.INVALID_TIMESTAMP, KafkaError.INVALID_RECORD) and not any(
            name == ORIGINAL_TIMESTAMP_HEADER for name, _ in headers
        ):
            # e.g. stamped further ahead than the DLQ topic allows: broker time, original in a header
            original = original_timestamp_header(message.timestamp()[1])
            self.produce_side(message.topic(), message.key(), message.value(), [*headers, original], 0)
            return
        self.delivery_errors.append(str(error))

    def flush_dlq(self, timeout: float = CHECKPOINT_FLUSH_S) -> None:
        """Every DLQ and late record of the checkpoint must be durable before the checkpoint commits.

        Records not delivered yet (Kafka unavailable) defer the checkpoint (``DlqNotFlushed``);
        records librdkafka gave up on (``message.timeout.ms``) end the run: the restart redoes them."""
        assert self.producer is not None
        stopping = self.stop.is_set()
        if stopping:  # whichever checkpoint asks (the last one, a revoke's during close): seconds at most
            timeout = min(timeout, STOP_FLUSH_S)
        deadline = time.monotonic() + timeout
        remaining = self.producer.flush(min(timeout, 0.5))
        # in slices, so that a stop asked meanwhile is seen: it has its own, shorter wait
        while remaining and time.monotonic() < deadline and (stopping or not self.stop.is_set()):
            remaining = self.producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
        topics = f"the dead-letter topic {self.dlq_topic} or the late topic {self.late_topic}"
        if self.delivery_errors:
            raise KappaError(f"could not write to {topics}: {'; '.join(self.delivery_errors[:3])}")
        if remaining:
            raise DlqNotFlushed(f"{remaining} records not yet delivered to {topics} within {timeout:.0f}s")

    # ---------------------------------------------------------------- checkpoint

    def checkpoint(self, partitions: set[int] | None = None, flush_timeout: float = CHECKPOINT_FLUSH_S) -> None:
        """DLQ flush -> per partition outputs + state JSON (commit point) -> Kafka commit -> garbage.

        A fenced partition commits nothing (not even its Kafka offset) and its state is dropped.
        """
        self.last_checkpoint = time.monotonic()
        targets = [s for p, s in self.states.items() if s.dirty and (partitions is None or p in partitions)]
        targets = [s for s in targets if s.next_offset is not None]
        if not targets:
            self.commit_offsets([])  # failed commits go again; an unanswered one is caught
            return
        self.flush_dlq(flush_timeout)
        committed, superseded = [], []
        for state in targets:
            try:
                superseded += self.store.commit(state)
                committed.append(TP(self.topic, state.partition, state.next_offset))
            except Fenced as exc:
                self.fenced(state.partition, exc)
        self.commit_offsets(committed)
        self.store.delete(superseded)

    def fenced(self, partition: int, exc: Fenced) -> None:
        """Another member committed this partition: never write it again from the state we hold."""
        self.summary.fenced_commits += 1
        self.states.pop(partition, None)
        self.refetch.add(partition)
        log.warning("fenced: %s (group %s); our state dropped, reloading from S3 if still assigned", exc, self.group)

    def commit_offsets(self, offsets: list[TP]) -> None:
        """Kafka commit after S3: for lag tools and the replay sensor; S3 stays authoritative.

        Asynchronous (``kafka.OffsetCommits``): a synchronous commit during a rebalance waits for
        the rebalance, which waits for this member to poll. A commit still unanswered after
        ``--commit-timeout`` raises a transient error instead, so the loop rejoins with a new
        consumer (``membership.UnansweredBudget``), which commits its offsets again for the
        partitions still ours, as it does for failed commits.
        """
        assert self.consumer is not None
        self.commits.send(self.consumer, offsets, owned=self.states)
        late = self.commits.overdue()
        if late is not None:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"offset commit: {late}"))

    # ---------------------------------------------------------------- bounded mode

    def bounded_end_offsets(self, partitions: int) -> dict[int, int]:
        """End offsets fixed at the first start of this group, so every restart targets the same input."""
        key = f"{self.prefix}_state/bounded.json"
        data = get_bytes(self.client, self.settings.s3_bucket, key)
        if data is not None:
            doc = json.loads(data)
            if doc["topic"] != self.topic:
                raise KappaError(f"group {self.group} already processed topic {doc['topic']!r}; use a new --group")
            recorded = {int(p): o for p, o in doc["end_offsets"].items()}
            if self.requested_end is not None and self.requested_end != recorded:
                raise KappaError(f"group {self.group} runs to end offsets {recorded}, not {self.requested_end}")
            return recorded
        end = self.requested_end or kafka_helpers.end_offsets(self.settings, self.topic)
        if sorted(end) != list(range(partitions)):
            raise KappaError(f"end offsets must name partitions 0..{partitions - 1} of {self.topic}, got {sorted(end)}")
        doc = {"topic": self.topic, "group": self.group, "end_offsets": {str(p): o for p, o in sorted(end.items())}}
        try:  # create-only: two members starting together must agree on one set of end offsets
            put_if(self.client, self.settings.s3_bucket, key, json.dumps(doc).encode(), None)
        except Fenced:
            return self.bounded_end_offsets(partitions)  # the other member's record wins
        return end

    def finished(self) -> bool:
        """True when every partition of the topic is finalized in S3 (by us or another group member)."""
        if any(not s.finalized or s.dirty for s in self.states.values()):
            return False
        if time.monotonic() - self.last_global_check < 1.0:
            return False
        self.last_global_check = time.monotonic()
        states = list_states(self.client, self.settings.s3_bucket, self.prefix)
        return all(
            p in states and states[p]["finalized"] and states[p]["next_offset"] >= end for p, end in self.end.items()
        )

    def write_reports(self) -> None:
        """Per day: report.parquet, then stats.json. Deterministic, so any member may (re)write them."""
        bucket = self.settings.s3_bucket
        states = list_states(self.client, bucket, self.prefix)
        self.summary.stats = day_stats(states)
        for day, stats in self.summary.stats.items():
            report = results_for_day(self.client, bucket, self.prefix, self.pipeline, day, states=states)
            report_key = keys.report_file(self.pipeline.name, self.pipeline.version, day)
            stats_key = keys.report_stats_file(self.pipeline.name, self.pipeline.version, day)
            self.store.put(report_key, to_parquet(report))
            report_stats.write_stats(self.client, bucket, stats_key, report_stats.ReportStats.of(stats))
            self.summary.reports[day], self.summary.stats_files[day] = report_key, stats_key

    # ---------------------------------------------------------------- progress

    def report_progress(self) -> None:
        if isinstance(self.progress, NoProgress):
            return
        now = time.monotonic()
        if self.bounded:
            self.lag = sum(max(0, self.end[p] - (s.next_offset or 0)) for p, s in self.states.items())
        elif now - self.last_lag >= 5.0:
            self.last_lag, self.lag = now, self.live_lag()
        self.progress.update(self.summary.records, self.lag, self.summary.late_records)

    def live_lag(self) -> int | None:
        assert self.consumer is not None
        try:
            lag = 0
            for partition, state in self.states.items():
                _low, high = self.consumer.get_watermark_offsets(TP(self.topic, partition), timeout=1.0)
                lag += max(0, high - (state.next_offset if state.next_offset is not None else high))
            return lag
        except KafkaException:
            return None


def late_headers(pipeline: Pipeline, topic: str, partition: int, offset: int, window: int,
                 watermark: int) -> list[tuple[str, bytes]]:
    """The ``kappa.late.*`` headers of a late record (appended after the record's own)."""
    values = (topic, partition, offset, window, window + pipeline.window_ms, watermark)
    return list(zip(LATE_HEADERS, [*(str(v).encode() for v in values), pipeline.label.encode()], strict=True))


def original_timestamp_header(timestamp: int) -> tuple[str, bytes]:
    return ORIGINAL_TIMESTAMP_HEADER, str(timestamp).encode()


def truncated_header(size: int) -> tuple[str, bytes]:
    return TRUNCATED_HEADER, f"value of {size} bytes dropped: too large for the DLQ topic; see the raw archive".encode()


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop``: the loop then checkpoints and exits cleanly (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_processor(
    settings: Settings,
    pipeline: str,
    version: int,
    *,
    topic: str | None = None,
    group: str | None = None,
    bounded: bool = False,
    start: Start = "latest",
    start_offsets: Mapping[int, int] | None = None,
    end_offsets: Mapping[int, int] | None = None,
    grace_ms: int | None = LIVE_GRACE_MS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
    dlq_topic: str | None = None,
    late_topic: str | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    handoff: bool = False,
    instance_id: str | None = None,
    group_protocol: str | None = None,
    session_timeout: float = DEFAULT_SESSION_TIMEOUT_S,
    commit_timeout: float = kafka_helpers.COMMIT_LIMIT_S,
    stage: Literal["both", "1", "2"] = "both",
    shuffle_partitions: int | None = None,
    check_broker: bool = False,
) -> RunSummary:
    """Run the processor until ``stop`` (live) or until the whole topic is processed (``bounded``).

    ``handoff`` starts the live processor of the promoted version at its switch (``workers/processor/handoff.py``).

    ``grace_ms=None`` means windows close only at the end of a bounded run (the default for replays
    in the CLI). ``instance_id``/``group_protocol``: see :mod:`workers.membership`.
    Raises :class:`KappaError` for user mistakes (unknown pipeline, bad group, ...).
    A pipeline with a state key runs as two stages joined by a repartition topic (``workers/processor/shuffle.py``;
    ``stage`` runs one of them alone, ``shuffle_partitions`` sizes the topic, default: the input's).
    ``check_broker`` (the CLI) checks that Kafka answers after the arguments: one line while it is down.
    """
    impl = get_pipeline(pipeline, version)
    if batch_size < 1 or checkpoint_seconds <= 0 or (grace_ms is not None and grace_ms < 0):
        raise KappaError("batch size must be >= 1, checkpoint interval > 0 and grace >= 0")
    membership.validate(instance_id, group_protocol)
    if not 6 <= session_timeout <= 300:
        raise KappaError(f"--session-timeout must be between 6 and 300 seconds, got {session_timeout}")
    if commit_timeout <= 0:
        raise KappaError(f"--commit-timeout must be > 0 seconds, got {commit_timeout}")
    if not bounded and grace_ms is None:
        raise KappaError("a live processor needs a finite grace period (windows would never close)")
    stop = stop or threading.Event()
    switch = None
    if handoff:
        if bounded or start_offsets is not None:
            raise KappaError("--handoff is for the live processor and brings its own start offsets")
        switch = handoff_lib.promoted_switch(s3_client(settings), settings.s3_bucket, pipeline, version)
        start_offsets = switch.start
    options: dict[str, Any] = dict(
        topic=keys.valid_topic(settings.events_topic if topic is None else topic),
        group=keys.valid_group(keys.live_group(pipeline, version, prefix=settings.group_prefix) if group is None
                               else group),
        bounded=bounded,
        start=start,
        start_offsets=start_offsets,
        end_offsets=end_offsets,
        grace_ms=grace_ms,
        batch_size=batch_size,
        checkpoint_seconds=checkpoint_seconds,
        dlq_topic=keys.valid_topic(settings.dlq_topic if dlq_topic is None else dlq_topic),
        late_topic=keys.valid_topic(settings.late_topic if late_topic is None else late_topic),
        switch=switch,
        instance_id=instance_id,
        group_protocol=group_protocol,
        session_timeout=session_timeout,
        commit_timeout=commit_timeout,
    )
    if check_broker:  # ~60 ms: not paid by in-process callers (the benchmark times this call)
        kafka_helpers.check_reachable(settings)
    if impl.state_key:
        from workers.processor.shuffle import run_shuffled  # the shuffle builds on this module

        with stop_on_signals(stop):
            return run_shuffled(
                settings, impl, stage=stage, shuffle_partitions=shuffle_partitions,
                progress=progress or NoProgress(), stop=stop, **options,
            )
    processor = Processor(settings, impl, **options, progress=progress or NoProgress(), stop=stop)
    with stop_on_signals(stop):
        return processor.run()

