"""Compaction of a closed archive day on the real stack: same records, one atomic switch, readers never
lose or double a record, replays and both report checks unchanged (docs/ARCHITECTURE.md, "Compaction")."""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
import threading
import time
from typing import Any

import polars as pl
import pytest
from confluent_kafka import Consumer, TopicPartition

from kappa_dagster.replay.archive_reads import archive_day
from kappa_dagster.replay.target import ReplayTarget
from tests.replay_data import day_records
from workers import kafka as kafka_helpers
from workers import keys
from workers.archive import checkpoint as archiver_checkpoint
from workers.archive import compaction, layout
from workers.archive import format as archive_format
from workers.archive import stats as archive_stats
from workers.config import Settings
from workers.errors import KappaError
from workers.pipelines import get_pipeline
from workers.replay import loader as replay_loader
from workers.reports import reference

log = logging.getLogger("kappa.test.compaction")

DAY = "2026-11-20"
RECORDS = 1500
PIECES = 12  # small files per partition


def _write_small_files(s3: Any, settings: Settings, frame: pl.DataFrame, pieces: int = PIECES) -> int:
    """What a busy archiver leaves: many small files per partition, a few overlapping (crash re-writes)."""
    topic, bucket = settings.events_topic, settings.s3_bucket
    frame = frame.with_columns(pl.lit(topic).alias("topic"))
    written = 0
    for (partition,), part in frame.sort("offset").group_by(["partition"], maintain_order=True):
        size = max(1, part.height // pieces)
        for start in range(0, part.height, size):
            piece = part.slice(max(0, start - 2), size + (2 if start else 0))  # 2 rows overlap the previous file
            first, last = int(piece["offset"].min()), int(piece["offset"].max())
            key = keys.raw_file(topic, DAY, int(partition), first, last)
            s3.put_object(Bucket=bucket, Key=key, Body=archive_format.to_parquet_bytes(piece))
            written += 1
    return written


def _close_day(s3: Any, settings: Settings, frame: pl.DataFrame, skip: int | None = None) -> None:
    """The live topic exists and the archiver's checkpoints are past the day (as the archiver leaves them)."""
    kafka_helpers.ensure_topic(settings, settings.events_topic, 3)
    for partition in range(3):
        if partition == skip:
            continue
        offsets = frame.filter(pl.col("partition") == partition)["offset"]
        next_offset = 0 if offsets.is_empty() else int(offsets.max()) + 1  # type: ignore[arg-type]
        doc = archiver_checkpoint.ArchiverCheckpoint(settings.events_topic, partition, next_offset)
        s3.put_object(Bucket=settings.s3_bucket, Key=keys.archiver_checkpoint(settings.events_topic, partition),
                      Body=archiver_checkpoint.to_json(doc))


@pytest.fixture
def day(s3: Any, settings: Settings) -> pl.DataFrame:
    """A closed day of small files; returns its distinct records (what every reader must see)."""
    frame = day_records(DAY, RECORDS, partitions=3)
    assert _write_small_files(s3, settings, frame) > 3 * PIECES - 3
    _close_day(s3, settings, frame)
    return frame.with_columns(pl.lit(settings.events_topic).alias("topic")).sort(archive_format.RECORD_ID)


def _plain_listing(s3: Any, settings: Settings) -> list[str]:
    """What a user with a plain S3 listing and the documented naming sees under the day."""
    prefix = keys.raw_day_prefix(settings.events_topic, DAY)
    return [o["Key"] for o in s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix).get("Contents", [])
            if keys.parse_raw_file(o["Key"]) is not None]


def _plain_read(s3: Any, settings: Settings) -> pl.DataFrame:
    """A plain-listing user: read every listed data file, drop duplicate (topic, partition, offset) rows."""
    frames = [archive_format.from_parquet_bytes(s3.get_object(Bucket=settings.s3_bucket, Key=k)["Body"].read())
              for k in _plain_listing(s3, settings)]
    return archive_format.dedup(frames)


def test_compaction_keeps_exactly_the_records(s3: Any, settings: Settings, day: pl.DataFrame) -> None:
    bucket, topic = settings.s3_bucket, settings.events_topic
    before_files = archive_format.day_files(s3, bucket, topic, DAY)
    fingerprint = archive_stats.day_fingerprint(s3, bucket, topic, DAY)
    assert archive_format.read_day(s3, bucket, topic, DAY).equals(day)

    result = compaction.compact_day(settings, DAY, client=s3, target_rows=300)
    assert result.compacted and result.records == RECORDS and result.files_before == len(before_files)

    after_files = archive_format.day_files(s3, bucket, topic, DAY)
    assert {f["key"] for f in after_files}.isdisjoint(f["key"] for f in before_files)
    assert len(after_files) == result.files_after < len(before_files)
    assert all(f["last_offset"] - f["first_offset"] + 1 <= 300 for f in after_files)
    # byte-exact: values, keys, headers (incl. non-UTF-8 bytes), timestamps, offsets, null keys
    assert archive_format.read_day(s3, bucket, topic, DAY).equals(day)
    assert archive_stats.day_fingerprint(s3, bucket, topic, DAY) == fingerprint  # same data version
    assert archive_stats.days_fingerprints(s3, bucket, topic) == {DAY: fingerprint}
    pointer = layout.read_pointer(s3, bucket, topic, DAY)
    assert pointer is not None and pointer.state == "compacted" and not pointer.pending
    assert sorted(t[0] for t in pointer.replaced) == sorted(f["key"] for f in before_files)
    assert pointer.digest == compaction.content_digest(day)

    # a plain-listing user (the naming is unchanged) still reads exactly the day while both sets exist
    assert len(_plain_listing(s3, settings)) == len(before_files) + len(after_files)
    assert _plain_read(s3, settings).equals(day)
    # the grace period has not ended: nothing deleted; with no grace left, the old files go
    assert compaction.sweep(s3, bucket, topic, DAY, grace_s=3600)[0] == 0
    swept, note = compaction.sweep(s3, bucket, topic, DAY, grace_s=0)
    assert swept == len(before_files) and note == ""
    assert sorted(_plain_listing(s3, settings)) == sorted(f["key"] for f in after_files)
    assert _plain_read(s3, settings).equals(day)
    assert archive_stats.day_fingerprint(s3, bucket, topic, DAY) == fingerprint

    # compacting again finds nothing to do; a late file arriving later is read and compacted next time
    assert not compaction.compact_day(settings, DAY, client=s3, target_rows=300).compacted
    late = day.filter(pl.col("partition") == 0).head(3).with_columns(
        (pl.int_range(0, 3, dtype=pl.Int64) + 10_000).alias("offset"))  # same bytes, new offsets
    s3.put_object(Bucket=bucket, Key=keys.raw_file(topic, DAY, 0, 10_000, int(late["offset"].max())),
                  Body=archive_format.to_parquet_bytes(late))
    _close_day(s3, settings, pl.concat([day, late]))
    expected = pl.concat([day, late]).sort(archive_format.RECORD_ID)
    assert archive_format.read_day(s3, bucket, topic, DAY).equals(expected)
    again = compaction.compact_day(settings, DAY, client=s3, target_rows=300)
    assert again.compacted and again.generation == 2
    assert archive_format.read_day(s3, bucket, topic, DAY).equals(expected)


def test_a_day_that_is_not_closed_is_refused(s3: Any, settings: Settings) -> None:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    frame = day_records(DAY, 60, partitions=3)
    _write_small_files(s3, settings, frame, pieces=3)
    _close_day(s3, settings, frame, skip=1)  # partition 1 was never checkpointed by the archiver
    with pytest.raises(KappaError, match=r"not closed: the archiver has archived .*\[1\]"):
        compaction.compact_day(settings, DAY, client=s3)
    with pytest.raises(KappaError, match="is not closed until"):
        compaction.compact_day(settings, today, client=s3)
    assert layout.read_pointer(s3, settings.s3_bucket, settings.events_topic, DAY) is None
    command = [sys.executable, "-m", "workers.cli", "archive", "compact", "--day", DAY]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "not closed" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    _close_day(s3, settings, frame)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"compacted": true' in done.stdout


def _consume(settings: Settings, topic: str, end: dict[str, int]) -> list[tuple]:
    """Every record of the replay topic: (partition, key, value, timestamp, headers) in topic order."""
    consumer = Consumer(settings.kafka_config(**{"group.id": "kappa.test-compaction", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic, int(p), 0) for p in end])
    out: list[tuple] = []
    try:
        while len(out) < sum(end.values()):
            batch = consumer.consume(num_messages=1000, timeout=5)
            assert batch, f"timed out after {len(out)}/{sum(end.values())} records"
            out += [(m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1], m.headers())
                    for m in batch if m.error() is None]
    finally:
        consumer.close()
    return sorted(out, key=lambda r: (r[0], r[1]))


def _checks(s3: Any, settings: Settings, objects: list | None = None) -> tuple[pl.DataFrame, Any]:
    """Both report checks' archive sides: the batch check's report and the SQL reference (rows, fingerprint)."""
    pipeline = get_pipeline("orders", 2)
    batch, _ = pipeline.batch_report(archive_day(s3, settings, ReplayTarget("orders", 2, DAY)))
    with reference.snapshot(s3, settings.s3_bucket, settings.events_topic, DAY, objects) as snap:
        ref = reference.compute(pipeline, snap)
    return batch, ref


def _spec(settings: Settings, run: str) -> replay_loader.ReplaySpec:
    return ReplayTarget("orders", 2, DAY).spec(settings, run=run)


def test_replay_and_checks_of_a_compacted_day_equal_the_uncompacted_day(
    s3: Any, settings: Settings, day: pl.DataFrame
) -> None:
    small = replay_loader.load(settings, _spec(settings, "small"), client=s3)
    replayed = _consume(settings, small.manifest.replay_topic, small.manifest.end_offsets)
    batch_small, ref_small = _checks(s3, settings)
    _, pinned_small = _checks(s3, settings, small.manifest.source_objects)
    compaction.compact_day(settings, DAY, client=s3, target_rows=400)
    # same records, same data version: the previous load still counts as a load of this archive
    reused = replay_loader.load(settings, _spec(settings, "big"), client=s3)
    assert reused.skipped and reused.reason == "the replay topic already holds this exact archive"
    _, pinned_after = _checks(s3, settings, small.manifest.source_objects)  # the gate of that load, after
    big = replay_loader.load(settings, _spec(settings, "big"), client=s3, force=True)
    batch_big, ref_big = _checks(s3, settings)
    try:
        assert big.manifest.source_files < small.manifest.source_files
        assert big.manifest.records == small.manifest.records == RECORDS
        assert big.manifest.source_fingerprint == small.manifest.source_fingerprint
        assert _consume(settings, big.manifest.replay_topic, big.manifest.end_offsets) == replayed
        assert batch_big.equals(batch_small) and batch_big.height > 0
        assert ref_big.rows == ref_small.rows and ref_big.outcomes == ref_small.outcomes
        assert ref_big.records == ref_small.records == RECORDS
        # the gate reads each load's pinned snapshot: both are fresh (same fingerprint as loaded)
        _, pinned_big = _checks(s3, settings, big.manifest.source_objects)
        for pinned in (pinned_small, pinned_after, pinned_big):
            assert pinned.fingerprint == small.manifest.source_fingerprint and pinned.rows == ref_small.rows
    finally:
        replay_loader.cleanup(settings, small.manifest, s3)
        replay_loader.cleanup(settings, big.manifest, s3)


def test_compacting_while_replaying_and_checking_loses_nothing_and_doubles_nothing(
    s3: Any, settings: Settings, day: pl.DataFrame
) -> None:
    """The loader lists the small files, compaction switches while the loader reads them, and the checks
    read the day at every step of the compaction: every reader sees exactly the day, one set of files."""
    bucket, topic = settings.s3_bucket, settings.events_topic
    old_keys = {f["key"] for f in archive_format.day_files(s3, bucket, topic, DAY)}
    events: dict[str, float] = {}
    switched, loader_reading = threading.Event(), threading.Event()
    seen: dict[str, tuple[set[str], pl.DataFrame, Any]] = {}
    errors: list[BaseException] = []

    def readers_at(step: str) -> None:
        """Both checks' reads, and a plain listing, in the middle of the compaction."""
        events[step] = time.monotonic()
        keys_now = {f["key"] for f in archive_format.day_files(s3, bucket, topic, DAY)}
        batch, ref = _checks(s3, settings)
        seen[step] = (keys_now, batch, ref)
        assert _plain_read(s3, settings).equals(day)
        if step == "switched":
            switched.set()

    def compact() -> None:
        try:
            assert loader_reading.wait(60), "the loader never started reading"
            compaction.compact_day(settings, DAY, client=s3, target_rows=400, hook=readers_at)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            switched.set()

    def progress(p: replay_loader.LoadProgress) -> None:
        if p.phase == "sort" and p.done == 1 and "loader_first_read" not in events:
            events["loader_first_read"] = time.monotonic()
            loader_reading.set()
            assert switched.wait(120), "compaction never switched"  # keep reading old files after the switch

    worker = threading.Thread(target=compact, name="compaction")
    worker.start()
    result = replay_loader.load(settings, _spec(settings, "during"), client=s3, progress=progress, progress_interval=0)
    events["loader_done"] = time.monotonic()
    worker.join(120)
    try:
        assert not errors, errors
        # the concurrency really overlapped: listed and began reading before the switch, finished after it
        assert events["loader_first_read"] < events["pending"] < events["switched"] < events["loader_done"]
        assert {o[0] for o in result.manifest.source_objects} == old_keys
        records = _consume(settings, result.manifest.replay_topic, result.manifest.end_offsets)
        sources = [(int(h[-2][1]), int(h[-1][1])) for *_, h in records]
        assert len(sources) == len(set(sources)) == RECORDS  # nothing doubled
        assert set(sources) == set(day.select("partition", "offset").iter_rows())  # nothing lost
        # each check read exactly one set: the old one until the switch, the new one from it
        reference_rows = seen["pending"][2].rows
        for step in ("pending", "written", "switched"):
            keys_now, batch, ref = seen[step]
            assert (keys_now == old_keys) == (step != "switched")
            assert keys_now.isdisjoint(old_keys) == (step == "switched")
            assert ref.records == RECORDS and ref.rows == reference_rows
            assert batch.equals(seen["pending"][1])
    finally:
        replay_loader.cleanup(settings, result.manifest, s3)


@pytest.mark.soak
def test_measure_how_much_faster_a_compacted_day_loads(s3: Any, settings: Settings) -> None:
    """Logs (never asserts) the load time of one day as 600 small files vs compacted; see the report."""
    frame = day_records(DAY, 300_000, partitions=3)
    files = _write_small_files(s3, settings, frame, pieces=200)
    _close_day(s3, settings, frame)
    small = replay_loader.load(settings, _spec(settings, "small"), client=s3)
    compaction_started = time.monotonic()
    compaction.compact_day(settings, DAY, client=s3)
    compaction_s = time.monotonic() - compaction_started
    big = replay_loader.load(settings, _spec(settings, "big"), client=s3, force=True)  # same data version: forced
    try:
        assert big.manifest.records == small.manifest.records == 300_000
        speedup = small.manifest.load_seconds / big.manifest.load_seconds
        message = (f"one day of 300k records: {files} small files load in {small.manifest.load_seconds:.2f}s, "
                   f"{big.manifest.source_files} compacted files in {big.manifest.load_seconds:.2f}s "
                   f"({speedup:.2f}x); compaction took {compaction_s:.2f}s")
        log.warning(message)
        print(message)
    finally:
        replay_loader.cleanup(settings, small.manifest, s3)
        replay_loader.cleanup(settings, big.manifest, s3)


def test_dagster_asset_compacts_a_closed_day_and_refuses_an_open_one(
    s3: Any, settings: Settings, day: pl.DataFrame
) -> None:
    import dagster as dg

    from kappa_dagster.defs.compaction import archive_compaction
    from kappa_dagster.defs.resources import KappaResource

    resources = {"kappa": KappaResource()}
    done = dg.materialize([archive_compaction], partition_key=DAY, resources=resources)
    (materialization,) = done.asset_materializations_for_node("archive_compaction")
    assert materialization.metadata["compacted"].value is True
    assert materialization.metadata["records"].value == RECORDS
    assert archive_format.read_day(s3, settings.s3_bucket, settings.events_topic, DAY).equals(day)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    refused = dg.materialize([archive_compaction], partition_key=today, resources=resources, raise_on_error=False)
    assert not refused.success
    failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"day {today} is not closed until" in failure.step_failure_data.error.message


def test_a_compaction_that_loses_a_record_is_never_switched(
    s3: Any, settings: Settings, day: pl.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that drops one record per file: verification (read back from S3) refuses the switch."""
    bucket, topic = settings.s3_bucket, settings.events_topic
    old_keys = {f["key"] for f in archive_format.day_files(s3, bucket, topic, DAY)}
    real = archive_format.to_parquet_bytes
    with monkeypatch.context() as patched:
        patched.setattr(archive_format, "to_parquet_bytes", lambda frame: real(frame.head(frame.height - 1)))
        with pytest.raises(KappaError, match="not switched, the old files stay current"):
            compaction.compact_day(settings, DAY, client=s3, target_rows=400)
    pointer = layout.read_pointer(s3, bucket, topic, DAY)
    assert pointer is not None and pointer.state == "compacted" and pointer.pending and not pointer.replaced
    assert {f["key"] for f in archive_format.day_files(s3, bucket, topic, DAY)} == old_keys
    assert archive_format.read_day(s3, bucket, topic, DAY).equals(day)
    assert len(_plain_listing(s3, settings)) > len(old_keys)  # the bad files exist, hidden as pending
    assert compaction.compact_day(settings, DAY, client=s3, target_rows=400).compacted  # next run goes ahead
    compaction.sweep(s3, bucket, topic, DAY, grace_s=0)
    current = archive_format.day_files(s3, bucket, topic, DAY)
    assert sorted(_plain_listing(s3, settings)) == sorted(f["key"] for f in current)  # no orphan left
    assert _plain_read(s3, settings).equals(day)
