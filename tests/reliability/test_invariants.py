"""The archive check can fail: it counts overlaps apart from extra, differing and missing rows.

A real topic holds four records; hand-made archive objects (written with plain polars in the archive
contract's schema, no archiver code) add overlaps, extra rows, altered bytes or leave rows out, and the
check must count each kind and fail on all but the overlaps.
"""

from __future__ import annotations

import io
from typing import Any

import polars as pl
import pytest
from confluent_kafka import Producer

from workers import kafka as kafka_helpers
from workers.config import Settings

from .invariants import ARCHIVE_SCHEMA, RecordBody, RecordId, assert_archive_exact, check_archive, read_topic

DAY_MS = 1_795_132_800_000  # 2026-11-20T00:00:00Z
DAY = "2026-11-20"


@pytest.fixture
def topic_records(settings: Settings) -> dict[RecordId, RecordBody]:
    """Four records in a one-partition topic, as a plain consumer reads them back."""
    kafka_helpers.ensure_topic(settings, settings.events_topic, 1)
    producer = Producer(settings.kafka_config(**{"enable.idempotence": True}))
    for offset in range(4):
        producer.produce(settings.events_topic, key=f"k{offset}".encode(), value=f"v{offset}".encode(),
                         headers=[("h", b"\xff"), ("n", None)], timestamp=DAY_MS + offset, partition=0)
    assert producer.flush(30) == 0
    return read_topic(settings, settings.events_topic)


def write_object(client: Any, settings: Settings, rows: list[tuple[RecordId, RecordBody]]) -> None:
    """One raw archive object holding ``rows``, named by the contract (day, partition, offset range)."""
    frame = pl.DataFrame(
        [{"topic": settings.events_topic, "partition": p, "offset": o, "timestamp": stamp, "timestamp_type": kind,
          "key": key, "value": value, "headers": [{"key": k, "value": v} for k, v in headers]}
         for (p, o), (kind, stamp, key, value, headers) in rows],
        schema={**ARCHIVE_SCHEMA, "timestamp": pl.Int64},
    ).with_columns(pl.col("timestamp").cast(pl.Datetime("ms", "UTC")))
    first, last = rows[0][0][1], rows[-1][0][1]
    key = f"raw/{settings.events_topic}/dt={DAY}/part=0/{first:020d}-{last:020d}.parquet"
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    client.put_object(Bucket=settings.s3_bucket, Key=key, Body=buffer.getvalue())


def archive(client: Any, settings: Settings, *objects: list[tuple[RecordId, RecordBody]]) -> None:
    """Replace the topic's whole raw archive with ``objects``."""
    listing = client.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"raw/{settings.events_topic}/")
    for obj in listing.get("Contents", []):
        client.delete_object(Bucket=settings.s3_bucket, Key=obj["Key"])
    for rows in objects:
        write_object(client, settings, rows)


def altered(row: tuple[RecordId, RecordBody]) -> tuple[RecordId, RecordBody]:
    rid, (kind, stamp, key, value, headers) = row
    return rid, (kind, stamp, key, (value or b"") + b"!", headers)


def test_archive_check_counts_overlaps_and_fails_on_extra_differing_and_missing_rows(
    settings: Settings, s3, topic_records: dict[RecordId, RecordBody]
) -> None:
    rows = sorted(topic_records.items())
    assert len(rows) == 4

    archive(s3, settings, rows, rows[2:])  # a crash re-wrote offsets 2-3: overlaps, allowed
    check = assert_archive_exact(settings, s3, figures=None)
    assert (check.overlap_rows, check.extra_rows, check.differing_rows, check.missing_rows) == (2, 0, 0, 0)

    (_p, last), body = rows[-1]
    archive(s3, settings, rows, [((0, last + 1), body)])  # an offset the topic never had
    assert check_archive(settings, s3).extra_rows == 1
    with pytest.raises(AssertionError, match="not records of the topic"):
        assert_archive_exact(settings, s3, figures=None)

    archive(s3, settings, rows, [altered(rows[1])])  # an overlapping copy with other bytes
    check = check_archive(settings, s3)
    assert (check.overlap_rows, check.differing_rows, check.missing_rows) == (0, 1, 0)
    with pytest.raises(AssertionError, match="differ from the topic"):
        assert_archive_exact(settings, s3, figures=None)

    archive(s3, settings, rows[:1], [altered(rows[1])], rows[2:])  # offset 1 only with other bytes
    check = check_archive(settings, s3)
    assert (check.differing_rows, check.missing_rows) == (1, 1)

    archive(s3, settings, rows[:3])  # the last record never archived
    assert check_archive(settings, s3).missing_rows == 1
    with pytest.raises(AssertionError, match="no byte-exact archive row"):
        assert_archive_exact(settings, s3, figures=None)
