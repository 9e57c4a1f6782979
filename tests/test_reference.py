"""The SQL reference (DuckDB) against the engine's own rules, on generated and hostile data.

Agreement here is evidence, not a tautology: the reference shares no code with ``workers.pipelines``
(its JSON rules, windows and dedup are SQL in ``workers/pipelines/orders.sql``), so every case where
both sides agree was reached twice, independently. Where they must disagree (duplicates of one
event_id on two partitions, which v2 still counts per partition until issue 12 lands), the
reference is the one following the `orders` rules, and the test shows the gate would catch it.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from replay_data import day_records, write_day
from test_pipelines import archive as archive_rows

from workers.archive import format as archive_format
from workers.archive import stats as archive_stats
from workers.pipelines import get_pipeline
from workers.reports import reference

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
import fuzz  # hostile value strategies shared with the reliability suite

DAY = "2026-11-20"


def run_reference(tmp_path: Path, frame: pl.DataFrame, version: int) -> reference.Reference:
    path = tmp_path / f"archive-{version}.parquet"
    path.write_bytes(archive_format.to_parquet_bytes(frame))
    # the same records twice (an overlapping archive file): the reference must count them once
    repeat = tmp_path / f"overlap-{version}.parquet"
    repeat.write_bytes(archive_format.to_parquet_bytes(frame.head(frame.height // 3)))
    return reference.compute(get_pipeline("orders", version), reference.Snapshot(DAY, "fp", [path, repeat]))


def engine_vs_reference(tmp_path: Path, frame: pl.DataFrame, version: int) -> tuple[list, dict, reference.Reference]:
    """The engine's batch mode over the same records, compared row by row with the reference."""
    pipeline = get_pipeline("orders", version)
    ref = run_reference(tmp_path, frame, version)
    report, stats = pipeline.batch_report(frame)
    buffer = io.BytesIO()
    report.write_parquet(buffer)
    columns, rows = reference.read_report(buffer.getvalue(), pipeline.key_columns)
    return reference.mismatches(columns, rows, ref, pipeline.key_columns), stats, ref


def frame_of(values: list[bytes | None], partitions: list[int], stamps: list[int]) -> pl.DataFrame:
    return archive_rows(values, stamps, partitions)


@pytest.mark.parametrize("version", [1, 2])
def test_reference_equals_the_engine_on_generated_days(tmp_path: Path, version: int) -> None:
    """Duplicates (same partition), late records, malformed values, null keys, overlapping files."""
    frame = pl.concat([day_records(DAY, 6000, partitions=3, seed=seed) for seed in (0, 1)])
    frame = frame.unique(subset=["partition", "offset"], keep="first", maintain_order=True)
    wrong, stats, ref = engine_vs_reference(tmp_path, frame, version)
    assert wrong == []
    assert {name: stats[name] for name in reference.OUTCOMES} == ref.outcomes
    assert ref.records == stats["records"] == frame.height
    assert ref.outcomes["dlq"] > 0 and (ref.outcomes["duplicates"] > 0) == (version == 2)


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
@pytest.mark.parametrize("version", [1, 2])
def test_reference_applies_the_json_rules_like_the_engine_on_hostile_values(tmp_path: Path, version: int) -> None:
    """Deep nesting, NaN/Infinity, trailing commas, lone surrogates, BOMs, invalid UTF-8, wrong types."""
    rng = random.Random(13)
    values: list[bytes | None] = []
    for _ in range(8):  # fresh hostile values every run (the reliability fuzz's strategies)
        values += fuzz.st.lists(fuzz.values, min_size=150, max_size=150).example()
    values += [
        b'{"event_id":"a","user_id":"u","type":"purchase","amount":1,"amount":true}',  # last key wins: a bool
        b'{"event_id":"a","user_id":"u","type":"purchase","amount":true,"amount":2.5}',  # last key wins: valid
        b'{"event_\\u0069d":"e","user_id":"u","type":"refund","amount":-3}',  # escaped key names
        b'{"event_id":"a","user_id":"u","type":"purchase","amount":[1,]}',  # trailing comma, nested
        b'{"event_id":"a","user_id":"u","type":"purchase","amount":1,"x":NaN}',  # NaN in an extra field
        b'{"event_id":"a","user_id":"u","type":"purchase","amount":999999999999999.9}',  # just in range
        b'{"event_id":"a","user_id":"u","type":"purchase","amount":1e15}',  # just out of range
        b'{"event_id":"a","user_id":"u","type":"page_view","amount":0.0000015}',  # micro-unit rounding
        b'{"event_id":"a","user_id":"u","type":"refund","amount":1} {"event_id":"b","user_id":"u","type":"refund",'
        b'"amount":1}',  # two documents in one value ...
        b" ",  # ... next to a blank one
    ]
    # one partition, event time rising with the offset: the engine's per-partition "first copy" is
    # then the reference's smallest (timestamp, partition, offset) (see the cross-partition test)
    stamps = sorted(1_790_000_000_000 + rng.randrange(0, 600_000) for _ in values)
    frame = frame_of(values, [0] * len(values), stamps)
    wrong, stats, ref = engine_vs_reference(tmp_path, frame, version)
    assert wrong == []
    assert {name: stats[name] for name in reference.OUTCOMES} == ref.outcomes
    assert ref.outcomes["dlq"] > 100 and ref.outcomes["counted"] > 100


def test_reference_counts_an_event_id_once_across_partitions(tmp_path: Path) -> None:
    """The `orders` dedup scope: copies on two partitions count once, and the copy with the smallest (timestamp,
    partition, offset) is the one that counts, in the reference and in v2 (which dedups through the
    shuffle), whatever order the copies arrived in."""
    base = 1_790_000_000_000
    original = b'{"event_id":"e1","user_id":"u","type":"purchase","amount":10}'
    resent = b'{"event_id":"e1","user_id":"u","type":"purchase","amount":99}'  # arrives first, later event time
    frame = frame_of([resent, original, resent], [1, 0, 1], [base + 500, base + 100, base + 900])
    ref = run_reference(tmp_path, frame, 2)
    assert ref.rows == [(base // 60_000 * 60_000, "purchase", 1, pytest.approx(10))]
    assert ref.outcomes == {"counted": 1, "dlq": 0, "duplicates": 2}
    wrong, stats, _ref = engine_vs_reference(tmp_path, frame, 2)
    assert wrong == []
    assert {name: stats[name] for name in reference.OUTCOMES} == ref.outcomes


def test_snapshot_reads_exactly_the_listed_versions(settings: Any, s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's fingerprint is the day's (listing + ETags); an object rewritten after the
    listing fails the read (If-Match on the listed ETag) instead of mixing two snapshots."""
    bucket, topic = settings.s3_bucket, settings.events_topic
    write_day(s3, bucket, topic, DAY, day_records(DAY, 300, partitions=2))
    with reference.snapshot(s3, bucket, topic, DAY) as snap:
        assert snap.fingerprint == archive_stats.day_fingerprint(s3, bucket, topic, DAY)
        assert reference.compute(get_pipeline("orders", 2), snap).records == 300
    listing = archive_format.day_files

    def listed_then_rewritten(*args: Any) -> list[dict]:
        files = listing(*args)
        s3.put_object(Bucket=bucket, Key=files[0]["key"], Body=archive_format.to_parquet_bytes(day_records(DAY, 5)))
        return files

    monkeypatch.setattr(archive_format, "day_files", listed_then_rewritten)
    with pytest.raises(reference.SnapshotChanged), reference.snapshot(s3, bucket, topic, DAY):
        pass
