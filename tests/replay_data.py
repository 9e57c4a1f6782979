"""Raw archive test data written with the archive contract helpers (what the archiver would write).

Each day gets orders events with: duplicate event_ids (re-sent records, v1 counts them, v2 drops
them), archive duplicates (an overlapping file repeats some (partition, offset) rows), late records
(high offsets, early timestamps), malformed values, null keys and non-UTF-8 header bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import zlib
from typing import Any

import polars as pl

from workers import keys
from workers.archive import format as archive_format
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest

TYPES = ["page_view", "add_to_cart", "purchase", "refund"]
MALFORMED = [
    b"not json",
    b'{"event_id": "x"}',
    b'{"event_id":"m","user_id":"u","type":"teleport","amount":1}',
    b"\xff\xfe",
    b'{"event_id":"a","user_id":"u","type":"refund","amount":1} {"event_id":"b","user_id":"u","type":"refund",'
    b'"amount":1}',  # two documents in one value
    b" ",
]


def _value(rng: random.Random, event_id: str) -> bytes:
    body = {"event_id": event_id, "user_id": f"u{rng.randint(1, 20)}", "type": rng.choice(TYPES)}
    body["amount"] = round(rng.uniform(0, 100), 2) if body["type"] in {"purchase", "refund"} else 0
    return json.dumps(body).encode()


def day_records(day: str, n: int, partitions: int = 3, seed: int = 0, start_offset: int = 0) -> pl.DataFrame:
    """``n`` records of one day spread over ``partitions``; offsets start at ``start_offset`` per partition."""
    rng = random.Random(f"{day}-{seed}")
    base = int(dt.datetime.fromisoformat(f"{day}T00:00:00+00:00").timestamp() * 1000)
    columns: dict[str, list[Any]] = {name: [] for name in archive_format.SCHEMA.names()}
    next_offset = dict.fromkeys(range(partitions), start_offset)
    sent: list[tuple[bytes, int, bytes | None, int]] = []
    for i in range(n):
        key = None if i % 11 == 0 else f"u{rng.randrange(7)}".encode()
        partition = zlib.crc32(key) % partitions if key else rng.randrange(partitions)
        roll = rng.random()
        late = rng.random() < 0.05
        ts = base + (rng.randrange(0, 60_000 * 10) if late else rng.randrange(0, 86_400_000 - 1))
        if roll < 0.05 and sent:
            # producer re-send: same event, key, partition and event time, new offset
            value, ts, key, partition = rng.choice(sent)
        elif roll < 0.08:
            value = rng.choice(MALFORMED)
        else:
            value = _value(rng, f"{day}-{seed}-{i}")
            sent.append((value, ts, key, partition))
        columns["topic"].append("ignored")
        columns["partition"].append(partition)
        columns["offset"].append(next_offset[partition])
        next_offset[partition] += 1
        columns["timestamp"].append(ts)
        columns["timestamp_type"].append(1)
        columns["key"].append(key)
        columns["value"].append(value)
        columns["headers"].append([] if i % 3 else [{"key": "h", "value": bytes([0xFF, i % 256])}])
    return archive_format.frame_from_columns(columns)


def write_day(client: Any, bucket: str, topic: str, day: str, frame: pl.DataFrame, overlap: bool = True) -> int:
    """Write ``frame`` as archive objects (two files per partition, the second overlapping the first)."""
    frame = frame.with_columns(pl.lit(topic).alias("topic"))
    written = 0
    for (partition,), part in frame.sort("offset").group_by(["partition"], maintain_order=True):
        half = max(1, part.height // 2)
        pieces = [part.slice(0, half), part.slice(max(0, half - 3) if overlap else half)]
        for piece in pieces:
            if piece.is_empty():
                continue
            key = keys.raw_file(topic, day, int(partition), int(piece["offset"].min()), int(piece["offset"].max()))
            client.put_object(Bucket=bucket, Key=key, Body=archive_format.to_parquet_bytes(piece))
            written += 1
    return written


def write_days(client: Any, bucket: str, topic: str, days: list[str], n: int, partitions: int = 3) -> pl.DataFrame:
    """Several days with offsets continuing across days (like a real topic); returns all records."""
    frames, start = [], 0
    for index, day in enumerate(days):
        frame = day_records(day, n, partitions, seed=index, start_offset=start)
        write_day(client, bucket, topic, day, frame)
        frames.append(frame)
        start += n
    return pl.concat(frames)


def _parse(value: bytes | None) -> dict[str, Any] | None:
    """The orders validity rules, restated: JSON object, string ids, known type, numeric amount."""
    try:
        body = json.loads(value) if value is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    amount = body.get("amount")
    if not (isinstance(body.get("event_id"), str) and isinstance(body.get("user_id"), str)):
        return None
    if body.get("type") not in TYPES or isinstance(amount, bool) or not isinstance(amount, int | float):
        return None
    return {"event_id": body["event_id"], "type": body["type"], "amount": float(amount)}


def orders_report(archive: pl.DataFrame, version: int) -> pl.DataFrame:
    """A plain polars computation of the orders report, written independently of workers.pipelines."""
    records = archive.unique(subset=["partition", "offset"]).sort(["timestamp", "partition", "offset"])
    parsed = [_parse(v) for v in records["value"].to_list()]
    valid = (
        records.select("timestamp", "partition")
        .with_columns(
            pl.Series("ok", [p is not None for p in parsed]),
            pl.Series("event_id", [p["event_id"] if p else None for p in parsed], dtype=pl.String),
            pl.Series("type", [p["type"] if p else None for p in parsed], dtype=pl.String),
            pl.Series("amount", [p["amount"] if p else None for p in parsed], dtype=pl.Float64),
        )
        .filter(pl.col("ok"))
    )
    valid = valid.with_columns(pl.col("timestamp").dt.truncate("1m").alias("window_start"))
    if version >= 2:  # a re-send lands in the same partition and window: dedup there
        valid = valid.unique(subset=["partition", "window_start", "event_id"], keep="first", maintain_order=True)
    return (
        valid.group_by("window_start", "type")
        .agg(pl.len().cast(pl.Int64).alias("events"), pl.col("amount").sum().cast(pl.Float64).alias("amount"))
        .sort(["window_start", "type"])
    )


def checked_manifest(bucket: str, topic: str, version: int, day: str, **fields: Any) -> ReplayManifest:
    """A manifest as the gate leaves a checked day of orders (the gate itself runs in test_dagster_gate)."""
    rid = replay_manifest.replay_id("orders", version, day, bucket, topic)
    return ReplayManifest(rid, "orders", version, day, topic, "reported", **fields)
