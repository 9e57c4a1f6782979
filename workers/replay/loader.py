"""Replay loader: one day of the raw archive -> a fresh replay topic, byte-exact and in event-time order.

A day can be larger than memory and a run can die or be overtaken, so the load is an external merge
sort, deterministic, idempotent and fenced by its manifest (docs/ARCHITECTURE.md, "The replay loader").
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from workers import kafka as kafka_helpers
from workers import keys, spill
from workers import s3 as s3_helpers
from workers.archive import format as archive_format
from workers.archive import stats as archive_stats
from workers.config import Settings
from workers.errors import KappaError
from workers.perf import gc_paused
from workers.pipelines import get_pipeline
from workers.processor import shuffle
from workers.replay.manifest import (
    LOADED_STATES,
    RUN_TOKEN_RE,
    ManifestFenced,
    ReplayManifest,
    published,
    range_id,
    range_slots,
    read_manifest,
    replay_id,
    write_manifest,
)
from workers.replay.producer import ReplayProducer
from workers.replay.sort import DEFAULT_MEMORY_ROWS, MIN_CHUNK_ROWS, SortedRun, merged_ahead, spill_sorted

log = logging.getLogger("kappa.replay")

#: The replay topic holds historical timestamps: time-based retention would delete it at once.
REPLAY_TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1", "message.timestamp.type": "CreateTime"}
#: Archive objects read, decoded and sorted at once in the sort phase.
READ_THREADS = 4
#: Loads of one topic before the loader gives up on a topic that never holds exactly what it produced.
LOAD_ATTEMPTS = 3

ProgressFn = Callable[["LoadProgress"], None]
T = TypeVar("T")


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
    #: the consumer group's first part (``Settings.group_prefix``, ``KAPPA_GROUP_PREFIX``)
    group_prefix: str = keys.DEFAULT_GROUP_PREFIX

    def __post_init__(self) -> None:
        if self.run is not None and not re.match(RUN_TOKEN_RE, self.run):
            raise KappaError(f"run token {self.run!r} must match {RUN_TOKEN_RE}")
        keys.valid_day(self.day)
        keys.valid_name(self.pipeline)
        keys.valid_group_prefix(self.group_prefix)
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
        return keys.replay_topic(self.source_topic, self.replay_id)

    @property
    def group(self) -> str:
        return keys.replay_group(self.pipeline, self.version, self.replay_id, prefix=self.group_prefix)

    @property
    def dlq_topic(self) -> str:
        """Rejects of the replay go here, not to the live DLQ (live already dead-lettered them)."""
        return keys.dlq_topic(self.topic)

    @property
    def late_topic(self) -> str:
        """Records later than grace in the replay go here, not to the live late topic."""
        return keys.late_topic(self.topic)

    @property
    def processor_prefix(self) -> str:
        """Where the bounded processor of this replay keeps its checkpoints."""
        return keys.processor_prefix(self.pipeline, self.version, self.group)


@dataclass(frozen=True)
class RangeSpec:
    """Many days in ONE replay: one topic and one consumer group for the whole range (docs/ARCHITECTURE.md,
    "Many days as one replay"). Each day keeps its own slot, manifest, lease and report."""

    days: tuple[ReplaySpec, ...]

    def __post_init__(self) -> None:
        if not self.days:
            raise KappaError("a replay range needs at least one day")
        shared = {(d.pipeline, d.version, d.source_topic, d.bucket, d.partitions, d.throttle, d.run) for d in self.days}
        if len(shared) != 1:
            raise KappaError("every day of a replay range has the same pipeline, version, archive and options")
        if len({d.day for d in self.days}) != len(self.days):
            raise KappaError(f"a replay range names a day twice: {[d.day for d in self.days]}")
        keys.valid_replay_id(self.replay_id)  # a name too long fails here, before anything is written

    @classmethod
    def of(cls, spec: ReplaySpec, days: list[str]) -> RangeSpec:
        """The range of ``days`` with ``spec``'s pipeline, version, archive and options."""
        return cls(tuple(dataclasses.replace(spec, day=day) for day in sorted(days)))

    def _first(self) -> ReplaySpec:
        return self.days[0]

    @property
    def day_names(self) -> list[str]:
        return [d.day for d in self.days]

    @property
    def bucket(self) -> str:
        return self._first().bucket

    @property
    def partitions(self) -> int | None:
        return self._first().partitions

    @property
    def throttle(self) -> float | None:
        return self._first().throttle

    @property
    def replay_id(self) -> str:
        first = self._first()
        base = range_id(first.pipeline, first.version, self.day_names, first.bucket, first.source_topic)
        return base if first.run is None else keys.valid_replay_id(f"{base}-{first.run}")

    @property
    def topic(self) -> str:
        return keys.replay_topic(self._first().source_topic, self.replay_id)

    @property
    def group(self) -> str:
        first = self._first()
        return keys.replay_group(first.pipeline, first.version, self.replay_id, prefix=first.group_prefix)

    def shared(self) -> dict[str, Any]:
        """The manifest fields every day of the range shares: where the replay lives and who consumes it."""
        first = self._first()
        return {
            "range_id": self.replay_id,
            "range_days": self.day_names,
            "replay_topic": self.topic,
            "group": self.group,
            "dlq_topic": keys.dlq_topic(self.topic),
            "late_topic": keys.late_topic(self.topic),
            "processor_prefix": keys.processor_prefix(first.pipeline, first.version, self.group),
        }


@dataclass
class LoadProgress:
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
    manifest: ReplayManifest
    skipped: bool
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def reset_consumer_side(settings: Settings, client: Any, manifest: ReplayManifest) -> None:
    """Forget everything a consumer derived from a previous load: group, processor checkpoints, DLQ."""
    kafka_helpers.delete_group(settings, manifest.group)
    delete_shuffle_internals(settings, manifest.group)
    s3_helpers.delete_prefix(client, settings.s3_bucket, manifest.processor_prefix)
    kafka_helpers.delete_topics(settings, [t for t in (manifest.dlq_topic, manifest.late_topic) if t])


def delete_shuffle_internals(settings: Settings, group: str) -> None:
    """A pipeline with a state key also left a repartition topic and a stage-2 group (workers/processor/shuffle.py)."""
    shuffle.delete_internal(settings, group)


def days_needing_topic(client: Any, bucket: str, manifest: ReplayManifest) -> list[str]:
    """The other days of ``manifest``'s range whose current manifest still reads its topic (not yet consumed).

    Empty for a one-day replay. A day that is consumed, reported or rejected no longer needs the topic:
    its report and stats are in S3, bound by ETag.
    """
    waiting = []
    for day, slot in range_slots(manifest).items():
        current = read_manifest(client, bucket, slot)
        reads = current is not None and current.replay_topic == manifest.replay_topic and not current.cleaned
        if reads and current is not None and current.status in {"loading", "loaded"}:
            waiting.append(day)
    return waiting


def cleanup(settings: Settings, manifest: ReplayManifest, client: Any | None = None) -> None:
    """Delete the replay topic, its DLQ, consumer group and processor checkpoints (the report is in S3)."""
    client = client or s3_helpers.s3_client(settings)
    kafka_helpers.delete_topics(settings, [manifest.replay_topic])
    reset_consumer_side(settings, client, manifest)


def source_partitions(settings: Settings, source_topic: str, files: list[dict]) -> int:
    """Partition count of the source: the live topic's if it exists, at least what the archive holds."""
    archived = max(int(f["partition"]) for f in files) + 1
    if kafka_helpers.exists(kafka_helpers.admin_client(settings), source_topic, 30):
        return max(archived, kafka_helpers.partition_count(settings, source_topic))
    return archived


# ---------------------------------------------------------------- the load


def archive_fingerprint(files: list[dict]) -> str:
    """The raw archive's data version of these objects (``archive_stats.day_fingerprint``: keys, sizes, ETags)."""
    return archive_stats.files_fingerprint(files)


def is_up_to_date(settings: Settings, client: Any, manifest: ReplayManifest | None, spec: ReplaySpec, fp: str) -> str:
    """Why the previous load can be reused ('' when it cannot)."""
    if not manifest or manifest.source_fingerprint != fp:
        return ""
    if manifest.partitions_requested != spec.partitions:
        return ""
    if published(client, spec.bucket, manifest):
        return "the checked report of this exact archive is already published"
    loaded = manifest.status in LOADED_STATES
    if loaded and kafka_helpers.topic_end_offsets(settings, manifest.replay_topic) == manifest.end_offsets:
        return "the replay topic already holds this exact archive"
    return ""


def base_manifest(spec: ReplaySpec, files: list[dict], fp: str, partitions: int) -> ReplayManifest:
    """The manifest of a load that starts now, over exactly these archive objects."""
    return ReplayManifest(
        slot=spec.slot,
        replay_id=spec.replay_id,
        pipeline=spec.pipeline,
        version=spec.version,
        day=spec.day,
        source_topic=spec.source_topic,
        replay_topic=spec.topic,
        group=spec.group,
        partitions_requested=spec.partitions,
        partitioning="source" if spec.partitions is None else "key",
        partitions=partitions,
        dlq_topic=spec.dlq_topic,
        late_topic=spec.late_topic,
        processor_prefix=spec.processor_prefix,
        report_key=keys.report_file(spec.pipeline, spec.version, spec.day),
        source_fingerprint=fp,
        archive_fingerprint=fp,
        event_time_ordered=True,
        source_files=len(files),
        source_objects=[[f["key"], int(f["size"]), f["etag"]] for f in files],
        source_bytes=sum(int(f["size"]) for f in files),
        status="loading",
        started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def _supersede(settings: Settings, client: Any, previous: ReplayManifest | None, manifest: ReplayManifest) -> None:
    """Delete the topic and group of the load this manifest replaced (never any other run's).

    Called only after the new manifest won its conditional write, so the previous load has no owner
    left: its run finished, failed, or lost the lease (and is fenced from writing).
    """
    if previous is None or previous.cleaned or previous.replay_topic == manifest.replay_topic:
        return
    waiting = days_needing_topic(client, settings.s3_bucket, previous)
    if waiting:  # a range's topic is deleted only once none of its days still has to be consumed from it
        manifest.superseded_not_cleaned.append(f"{previous.replay_id}: {previous.replay_topic} still feeds {waiting}")
        return
    try:
        cleanup(settings, previous, client)
    except KappaError as exc:  # e.g. a zombie member still in the old group: leave it, say so
        manifest.superseded_not_cleaned.append(f"{previous.replay_id}: {exc}")


def _abandon(settings: Settings, client: Any, manifest: ReplayManifest) -> None:
    """A load that lost its slot deletes its own topic (only that) so nothing is left behind."""
    with contextlib.suppress(Exception):
        kafka_helpers.delete_topics(settings, [manifest.replay_topic])


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

    partitions = spec.partitions or source_partitions(settings, spec.source_topic, files)
    manifest = base_manifest(spec, files, fp, partitions)
    manifest.etag = previous.etag if previous else None
    write_manifest(client, spec.bucket, manifest)  # fenced: only one run can replace `previous`
    _supersede(settings, client, previous, manifest)
    reporter = _Reporter(progress, progress_interval, lost)
    try:
        produced, stats, end = _load_exact(settings, client, spec, files, partitions, memory_rows, reporter,
                                           lambda: reset_consumer_side(settings, client, manifest))
        _mark_loaded(client, spec.bucket, manifest, produced, stats, end, reporter.elapsed())
    except ManifestFenced:
        _abandon(settings, client, manifest)
        raise
    return LoadResult(manifest, skipped=False, reason="loaded")


def _mark_loaded(
    client: Any, bucket: str, manifest: ReplayManifest, produced: int, stats: dict[str, Any], end: dict[str, int],
    seconds: float,
) -> None:
    """The ``loaded`` manifest of one day: its records and source end offsets, the topic's end offsets."""
    manifest.status = "loaded"
    manifest.records = produced
    manifest.rows_read = stats["rows_read"]
    manifest.duplicates_dropped = stats["rows_read"] - produced
    manifest.end_offsets = end
    manifest.source_end_offsets = kafka_helpers.offsets_json(stats["source_end"])
    manifest.loaded_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    manifest.load_seconds = round(seconds, 3)
    write_manifest(client, bucket, manifest)


def load_range(
    settings: Settings,
    spec: RangeSpec,
    *,
    client: Any | None = None,
    progress: ProgressFn | None = None,
    progress_interval: float = 2.0,
    force: bool = False,
    memory_rows: int = DEFAULT_MEMORY_ROWS,
    lost: threading.Event | None = None,
) -> dict[str, LoadResult]:
    """Load many days into ONE replay topic (one group consumes them all); day -> its result.

    Each day keeps its own manifest (its snapshot, records, source end offsets and, later, its report's
    checks) naming the range's shared topic and group. A day whose checked report of this exact archive is
    already published is reused alone; the others are reused together only when their manifests name one
    range topic over exactly them that still holds what was loaded, else loaded again. Days are sorted one
    at a time and produced in day order: days are disjoint in event time, so the topic is in event-time
    order per partition with the memory of a one-day load.
    """
    client = client or s3_helpers.s3_client(settings)
    listed = {day.day: archive_format.day_files(client, spec.bucket, day.source_topic, day.day) for day in spec.days}
    empty = [day for day, files in listed.items() if not files]
    if empty:
        raise KappaError(f"no raw archive objects for {', '.join(empty)} under s3://{spec.bucket}/raw/: "
                         "nothing to replay for them; leave them out of the range")
    fingerprints = {day: archive_fingerprint(files) for day, files in listed.items()}
    previous = {day.day: read_manifest(client, spec.bucket, day.slot) for day in spec.days}
    results: dict[str, LoadResult] = {}
    for day in spec.days:
        before = previous[day.day]
        if not force and before is not None and before.source_fingerprint == fingerprints[day.day] and (
            before.partitions_requested == day.partitions and published(client, spec.bucket, before)
        ):
            results[day.day] = LoadResult(before, skipped=True, reason="the checked report of this exact archive "
                                          "is already published")
    pending = [day for day in spec.days if day.day not in results]
    if not pending:
        return results
    reused = None if force else _reusable_range(settings, pending, previous, fingerprints)
    if reused is not None:
        return {**results, **{d: LoadResult(m, skipped=True, reason=reused[1]) for d, m in reused[0].items()}}
    loading = RangeSpec(tuple(pending))
    return {**results, **_load_days(settings, client, loading, listed, fingerprints, previous, memory_rows,
                                    _Reporter(progress, progress_interval, lost))}


def _reusable_range(
    settings: Settings, pending: list[ReplaySpec], previous: dict[str, ReplayManifest | None],
    fingerprints: dict[str, str],
) -> tuple[dict[str, ReplayManifest], str] | None:
    """The pending days' manifests when one earlier range load over exactly these days can be consumed again."""
    manifests = [previous[day.day] for day in pending]
    if any(m is None for m in manifests):
        return None
    found = {day.day: m for day, m in zip(pending, manifests, strict=True) if m is not None}
    topics = {m.replay_topic for m in found.values()}
    days = sorted(found)
    matching = all(
        m.source_fingerprint == fingerprints[d] and m.partitions_requested == pending[0].partitions
        and m.status in LOADED_STATES and sorted(m.range_days or [m.day]) == days
        for d, m in found.items()
    )
    if len(topics) != 1 or not matching:
        return None
    first = next(iter(found.values()))
    if kafka_helpers.topic_end_offsets(settings, first.replay_topic) != first.end_offsets:
        return None
    return found, "the replay topic already holds this exact archive"


def _load_days(
    settings: Settings, client: Any, spec: RangeSpec, listed: dict[str, list[dict]], fingerprints: dict[str, str],
    previous: dict[str, ReplayManifest | None], memory_rows: int, reporter: _Reporter,
) -> dict[str, LoadResult]:
    """Write every day's ``loading`` manifest (fenced), load them into the range topic, then mark each loaded."""
    files = [f for day in spec.day_names for f in listed[day]]
    partitions = spec.partitions or source_partitions(settings, spec.days[0].source_topic, files)
    manifests: dict[str, ReplayManifest] = {}
    for day in spec.days:
        manifest = dataclasses.replace(base_manifest(day, listed[day.day], fingerprints[day.day], partitions),
                                       **spec.shared())
        before = previous[day.day]
        manifest.etag = before.etag if before else None
        write_manifest(client, spec.bucket, manifest)  # fenced per day: only one run can replace each
        manifests[day.day] = manifest
    superseded: set[str | None] = set()
    for day in spec.days:
        before = previous[day.day]
        if before is not None and before.replay_topic not in superseded:  # a range it replaces: delete it once
            superseded.add(before.replay_topic)
            _supersede(settings, client, before, manifests[day.day])
    first = manifests[spec.days[0].day]
    try:
        per_day, end = _load_range_exact(settings, client, spec, listed, partitions, memory_rows, reporter,
                                         lambda: reset_consumer_side(settings, client, first))
        for day, manifest in manifests.items():
            _mark_loaded(client, spec.bucket, manifest, *per_day[day], end, reporter.elapsed())
    except ManifestFenced:
        _abandon(settings, client, next(iter(manifests.values())))
        raise
    return {day: LoadResult(manifest, skipped=False, reason="loaded") for day, manifest in manifests.items()}


def _load_range_exact(
    settings: Settings, client: Any, spec: RangeSpec, listed: dict[str, list[dict]], partitions: int,
    memory_rows: int, reporter: _Reporter, prepare: Callable[[], None],
) -> tuple[dict[str, tuple[int, dict[str, Any]]], dict[str, int]]:
    """Like :func:`_load_exact` for many days: each day sorted alone, all produced by one producer in day order."""

    def once(ready: Callable[[], None]) -> tuple[int, dict[str, tuple[int, dict[str, Any]]]]:
        producer: ReplayProducer | None = None
        per_day: dict[str, tuple[int, dict[str, Any]]] = {}
        for day in spec.day_names:
            with spill.spill_dir(f"replay-{spec.replay_id}") as tmp:
                runs, stats = _sort_files(client, spec.bucket, listed[day], tmp, memory_rows, reporter)
                if producer is None:  # the first day sorted: the topic must exist now
                    ready()
                    producer = ReplayProducer(settings, spec.topic, spec.partitions, spec.throttle)
                before = producer.produced
                _produce_runs(producer, runs, before + stats["rows_read"], reporter)
            per_day[day] = (producer.produced - before, stats)
        assert producer is not None  # a range holds at least one day
        _close(producer, reporter)
        return producer.produced, per_day

    return _exactly(settings, spec.topic, partitions, once, prepare)


def _load_exact(
    settings: Settings, client: Any, spec: ReplaySpec, files: list[dict], partitions: int, memory_rows: int,
    reporter: _Reporter, prepare: Callable[[], None],
) -> tuple[int, dict[str, Any], dict[str, int]]:
    """Sort and produce into a fresh topic until the topic holds exactly what was produced (:func:`_exactly`)."""

    def once(ready: Callable[[], None]) -> tuple[int, tuple[int, dict[str, Any]]]:
        with spill.spill_dir(f"replay-{spec.replay_id}") as tmp:
            runs, stats = _sort_files(client, spec.bucket, files, tmp, memory_rows, reporter)
            ready()
            producer = ReplayProducer(settings, spec.topic, spec.partitions, spec.throttle)
            _produce_runs(producer, runs, stats["rows_read"], reporter)
            produced = _close(producer, reporter)
        return produced, (produced, stats)

    (produced, stats), end = _exactly(settings, spec.topic, partitions, once, prepare)
    return produced, stats, end


def _exactly(
    settings: Settings, topic: str, partitions: int, once: Callable[[Callable[[], None]], tuple[int, T]],
    prepare: Callable[[], None],
) -> tuple[T, dict]:
    """Run ``once`` (load a fresh ``topic``; returns what it produced and its result) until the topic holds it.

    An idempotent producer re-sends records a restarted broker had already written when the broker
    lost its producer state (the producer id is reset), and an unclean broker stop can lose acked
    ones: the topic is disposable, so it is recreated and loaded again rather than left inexact.

    The Kafka set-up (``prepare``, the first time: forgetting what consumers derived from an earlier
    load; then the topic's delete and create, ~0.15 s on a kept 1M day here) runs on a helper thread
    while ``once`` reads and sorts the archive; ``once`` calls the ``ready`` it is given before it
    produces its first record.
    """
    for attempt in range(1, LOAD_ATTEMPTS + 1):

        def set_up(first: bool = attempt == 1) -> None:
            if first:
                prepare()
            kafka_helpers.recreate_topic(settings, topic, partitions, REPLAY_TOPIC_CONFIG)

        with meanwhile(set_up) as ready:
            produced, result = once(ready)
        end = kafka_helpers.topic_end_offsets(settings, topic) or {}
        if sum(end.values()) == produced:
            return result, end
        problem = f"replay topic {topic} holds {sum(end.values())} records, expected {produced}"
        if attempt == LOAD_ATTEMPTS:
            raise KappaError(f"{problem} after {LOAD_ATTEMPTS} loads: check the broker's health")
        log.warning("%s (a broker restart re-sent or lost records): loading it again (%d/%d)",
                    problem, attempt + 1, LOAD_ATTEMPTS)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def meanwhile(work: Callable[[], None]) -> Iterator[Callable[[], None]]:
    """Run ``work`` on a helper thread; yields ``ready``, which waits for it and raises what it raised.
    Leaving the block waits for it too (and raises its error if nobody called ``ready``)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kappa-replay-setup") as pool:
        future = pool.submit(work)
        yield future.result
        future.result()


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
            self.callback(LoadProgress(phase, done, total, now - self.phase_started))


def _sort_files(
    client: Any, bucket: str, files: list[dict], directory: Path, memory_rows: int, reporter: _Reporter
) -> tuple[list[SortedRun], dict[str, Any]]:
    """Phase 1: each S3 object alone -> a sorted run on local disk, READ_THREADS objects at a time
    (reading one overlaps decoding and sorting others; memory holds at most that many objects)."""
    chunk_rows = max(MIN_CHUNK_ROWS, memory_rows // len(files))
    runs, rows_read, source_end = [], 0, {}

    def sort_one(index: int) -> tuple[SortedRun, int, dict[int, int]]:
        frame = archive_format.from_parquet_bytes(_read_listed(client, bucket, files[index]))
        ends = dict(frame.group_by("partition").agg(pl.col("offset").max() + 1).iter_rows())
        return SortedRun(spill_sorted(frame, directory, f"{index:06d}", chunk_rows)), frame.height, ends

    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="kappa-replay-read") as pool:
        try:
            for index, (run, rows, ends) in enumerate(pool.map(sort_one, range(len(files)))):
                runs.append(run)
                rows_read += rows
                for partition, end in ends.items():
                    source_end[partition] = max(source_end.get(partition, 0), end)
                reporter("sort", index + 1, len(files), final=index + 1 == len(files))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return runs, {"rows_read": rows_read, "source_end": source_end}


def _read_listed(client: Any, bucket: str, file: dict) -> bytes:
    """The object at the version the listing (and so the fingerprint) saw, or a clear error."""
    try:
        return s3_helpers.get_if(client, bucket, file["key"], file["etag"])
    except s3_helpers.Fenced:
        raise KappaError(f"archive object {file['key']} changed during the load: run it again") from None


def _produce_runs(producer: ReplayProducer, runs: list[SortedRun], total: int, reporter: _Reporter) -> None:
    """Phase 2: merge the sorted runs (a thread ahead) and produce them."""
    reporter.phase()
    with gc_paused():
        for batch in merged_ahead(runs):
            producer.produce_frame(batch)
            reporter("produce", producer.produced, total)


def _close(producer: ReplayProducer, reporter: _Reporter) -> int:
    """Every record acknowledged, or the load fails; returns how many were produced."""
    producer.close()
    reporter("produce", producer.produced, producer.produced, final=True)
    return producer.produced
