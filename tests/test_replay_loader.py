"""Replay loader against the real broker and S3: byte-exact, ordered, deduplicated, idempotent, bounded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from confluent_kafka import Consumer, TopicPartition
from replay_data import day_records, write_day

from workers import kafka as kafka_helpers
from workers import keys
from workers.archive import format as archive_format
from workers.config import Settings
from workers.errors import KappaError
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest
from workers.replay import producer as replay_producer
from workers.replay import sort as replay_sort

DAY = "2026-11-20"


def _spec(settings: Settings, **overrides: Any) -> replay_loader.ReplaySpec:
    fields = {
        "pipeline": "orders",
        "version": 2,
        "day": DAY,
        "source_topic": settings.events_topic,
        "bucket": settings.s3_bucket,
        "partitions": 2,
        **overrides,
    }
    return replay_loader.ReplaySpec(**fields)


def _consume_all(settings: Settings, topic: str, end: dict[str, int]) -> list[Any]:
    consumer = Consumer(settings.kafka_config(**{"group.id": "kappa.test-reader", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic, int(p), 0) for p in end])
    messages, want = [], sum(end.values())
    try:
        while len(messages) < want:
            batch = consumer.consume(num_messages=1000, timeout=5)
            assert batch, f"timed out after {len(messages)}/{want} records"
            messages.extend(m for m in batch if m.error() is None)
    finally:
        consumer.close()
    return messages


def test_merge_runs_orders_and_dedups_with_tiny_chunks(tmp_path: Path) -> None:
    """The external merge, in isolation: many tiny chunks still give one global order, no duplicates."""
    frame = day_records(DAY, 400, partitions=3)
    files = [frame.slice(0, 250), frame.slice(200, 200), frame.slice(390, 10)]  # overlapping pieces
    runs = [
        replay_sort.SortedRun(replay_sort.spill_sorted(piece, tmp_path, f"r{i}", chunk_rows=7))
        for i, piece in enumerate(files)
    ]
    merged = pl.concat(list(replay_sort.merge_runs(runs)))
    expected = frame.sort(["timestamp", "partition", "offset"])
    assert merged.height == 400
    assert merged.select(archive_format.SCHEMA.names()).equals(expected)


@pytest.mark.parametrize("partitions", [None, 2], ids=["mirror-source", "by-key"])
def test_load_is_byte_exact_ordered_and_deduplicated(settings: Settings, s3: Any, partitions: int | None) -> None:
    frame = day_records(DAY, 600, partitions=3)
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, frame)  # overlapping files -> duplicates
    spec = _spec(settings, partitions=partitions)
    result = replay_loader.load(settings, spec, client=s3, memory_rows=1000)
    manifest = result.manifest
    try:
        assert not result.skipped
        assert manifest.records == 600 and manifest.duplicates_dropped > 0
        assert manifest.status == "loaded"
        assert replay_manifest.processor_grace_ms(manifest) == 0  # event-time ordered: replay_consume uses grace 0
        stored = replay_manifest.read_manifest(s3, settings.s3_bucket, spec.replay_id)
        assert stored == manifest
        messages = _consume_all(settings, spec.topic, manifest.end_offsets)
        by_source = {(r["partition"], r["offset"]): r for r in frame.iter_rows(named=True)}
        seen = set()
        for message in messages:
            headers = message.headers()
            src = (int(headers[-2][1]), int(headers[-1][1]))
            assert [h[0] for h in headers[-2:]] == ["kappa.src.partition", "kappa.src.offset"]
            row = by_source[src]
            assert message.key() == row["key"] and message.value() == row["value"]
            assert message.timestamp()[1] == int(row["timestamp"].timestamp() * 1000)
            assert headers[:-2] == [(h["key"], h["value"]) for h in row["headers"]]
            assert src not in seen
            seen.add(src)
            assert message.partition() == replay_producer.target_partition(row["key"], row["partition"], partitions)
        assert len(seen) == 600
        # deterministic order inside each replay partition: (timestamp, source partition, source offset)
        assert manifest.partitions == (partitions or 3)
        for partition in range(manifest.partitions):
            keys_in_order = [
                (m.timestamp()[1], int(m.headers()[-2][1]), int(m.headers()[-1][1]))
                for m in messages
                if m.partition() == partition
            ]
            assert keys_in_order == sorted(keys_in_order)
        # same key -> same replay partition
        partition_of: dict[bytes, int] = {}
        for message in messages:
            if message.key() is not None:
                assert partition_of.setdefault(message.key(), message.partition()) == message.partition()
        # live start offsets: where this day's archive ends per source partition
        expected_end = frame.group_by("partition").agg(pl.col("offset").max() + 1)
        assert manifest.source_end_offsets == {str(p): o for p, o in expected_end.iter_rows()}
    finally:
        replay_loader.cleanup(settings, manifest)


def test_set_up_runs_beside_the_sort_and_its_error_is_raised() -> None:
    """The loader deletes and creates its topic on a helper thread while it sorts (``meanwhile``): the
    work runs while the block runs, ``ready`` waits for it, and its error reaches the loader whether
    or not ``ready`` was called."""
    import threading

    started, release = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        assert release.wait(10)

    with replay_loader.meanwhile(slow) as ready:
        assert started.wait(10), "the set-up did not start before the block's own work"
        release.set()
        ready()

    def broken() -> None:
        raise KappaError("topic could not be created")

    with pytest.raises(KappaError, match="could not be created"), replay_loader.meanwhile(broken) as ready:
        ready()
    with pytest.raises(KappaError, match="could not be created"), replay_loader.meanwhile(broken):
        pass


def test_load_is_idempotent_and_recovers_from_a_partial_load(settings: Settings, s3: Any) -> None:
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, day_records(DAY, 200, partitions=2))
    spec = _spec(settings)
    first = replay_loader.load(settings, spec, client=s3)
    try:
        again = replay_loader.load(settings, spec, client=s3)
        assert again.skipped and "already holds" in again.reason
        expected = {int(p): o for p, o in first.manifest.end_offsets.items()}
        assert kafka_helpers.end_offsets(settings, spec.topic) == expected
        # a crash mid-load leaves status "loading" and extra records in the topic: the re-run starts over
        partial = replace(first.manifest, status="loading")
        replay_manifest.write_manifest(s3, settings.s3_bucket, partial)
        producer = replay_producer.ReplayProducer(settings, spec.topic, spec.partitions, None)
        producer.producer.produce(spec.topic, value=b"stray", partition=0)
        producer.close()
        redo = replay_loader.load(settings, spec, client=s3)
        assert not redo.skipped
        assert redo.manifest.end_offsets == first.manifest.end_offsets
        assert sum(redo.manifest.end_offsets.values()) == 200
        # new data for the day (late archive file) changes the fingerprint -> reload
        extra = day_records(DAY, 10, partitions=2, seed=9, start_offset=10_000)
        write_day(s3, settings.s3_bucket, settings.events_topic, DAY, extra, overlap=False)
        grown = replay_loader.load(settings, spec, client=s3)
        assert not grown.skipped and grown.manifest.records == 210
    finally:
        replay_loader.cleanup(settings, first.manifest)


def test_throttle_and_progress(settings: Settings, s3: Any) -> None:
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, day_records(DAY, 300, partitions=2))
    seen: list[replay_loader.LoadProgress] = []
    spec = _spec(settings, throttle=600.0)
    result = replay_loader.load(settings, spec, client=s3, progress=seen.append, progress_interval=0.1)
    try:
        assert result.manifest.load_seconds >= 0.4  # 300 records at 600/s
        produce = [p for p in seen if p.phase == "produce"]
        assert produce and produce[-1].done == 300 and produce[-1].rate <= 900
        assert "eta" in produce[0].describe()
    finally:
        replay_loader.cleanup(settings, result.manifest)


@pytest.mark.parametrize("day", ["2026-11-21", "../", "2026-13-45"])
def test_bad_days_fail_clearly_and_write_nothing(settings: Settings, s3: Any, day: str) -> None:
    with pytest.raises(KappaError, match=r"nothing to replay|YYYY-MM-DD|calendar"):
        replay_loader.load(settings, _spec(settings, day=day), client=s3)
    assert list(s3.list_objects_v2(Bucket=settings.s3_bucket).get("Contents", [])) == []
    assert not any(
        ".replay." in t
        for t in kafka_helpers.admin_client(settings).list_topics(timeout=10).topics
        if t.startswith(settings.events_topic)
    )


def test_bad_version_and_partitions_fail_clearly(settings: Settings) -> None:
    with pytest.raises(KappaError, match="version"):
        _spec(settings, version=0)
    with pytest.raises(KappaError, match="has no version 99"):
        _spec(settings, version=99)
    with pytest.raises(KappaError, match="partitions"):
        _spec(settings, partitions=0)
    assert keys.valid_replay_id(_spec(settings).replay_id)


def test_cli_load_then_reuse(settings: Settings, s3: Any) -> None:
    import json
    import subprocess
    import sys

    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, day_records(DAY, 80, partitions=2))
    command = [sys.executable, "-m", "workers.cli", "replay", "load", "--day", DAY, "--version", "2"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    try:
        assert sum(summary["end_offsets"].values()) == 80
        again = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "skipped" in again.stdout
        bad = subprocess.run([*command[:-1], "99"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "has no version 99" in bad.stderr
    finally:
        manifest = replay_manifest.read_manifest(s3, settings.s3_bucket, summary["replay_id"])
        if manifest is not None:
            replay_loader.cleanup(settings, manifest)
