"""Cheap facts about the raw archive (objects, bytes, rows per day) from listings and Parquet footers.

Counting rows must not download a day: a Parquet file ends with its footer (metadata, including
row counts) followed by the footer length and ``PAR1``. Two small ranged GETs fetch just that, and
polars reads the row count from a stub file made of the footer alone.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import polars as pl

from workers.archive import format as archive_format
from workers.archive import layout

TAIL_BYTES = 64 * 1024


def parquet_rows(client: Any, bucket: str, key: str, size: int) -> int:
    """Row count of one Parquet object, reading only its footer."""
    start = max(0, size - TAIL_BYTES)
    tail = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{size - 1}")["Body"].read()
    footer_len = int.from_bytes(tail[-8:-4], "little")
    if footer_len + 8 > len(tail):
        begin = size - footer_len - 8
        tail = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={begin}-{size - 1}")["Body"].read()
    stub = b"PAR1" + tail[-(footer_len + 8) :]
    return int(pl.scan_parquet(io.BytesIO(stub)).select(pl.len()).collect().item())


def day_summary(client: Any, bucket: str, topic: str, day: str, count_rows: bool = True) -> dict[str, Any]:
    """Objects, bytes and rows (duplicates between overlapping files included) of one day."""
    files = archive_format.day_files(client, bucket, topic, day)
    rows = sum(parquet_rows(client, bucket, f["key"], int(f["size"])) for f in files) if count_rows else None
    return {
        "objects": len(files),
        "bytes": sum(int(f["size"]) for f in files),
        "rows": rows,
        "partitions": sorted({int(f["partition"]) for f in files}),
        "listing": [(f["key"], int(f["size"])) for f in files],
    }


def days_listing(client: Any, bucket: str, topic: str) -> dict[str, list[tuple[str, int]]]:
    """Every day of the archive -> its (key, size) objects, from one paginated listing."""
    days = _days_objects(client, bucket, topic)
    return {day: [(f["key"], int(f["size"])) for f in files] for day, files in days.items()}


def days_fingerprints(client: Any, bucket: str, topic: str) -> dict[str, str]:
    """Every day of the archive -> the fingerprint of its snapshot, from one paginated listing."""
    return {day: files_fingerprint(files) for day, files in _days_objects(client, bucket, topic).items()}


def day_fingerprint(client: Any, bucket: str, topic: str, day: str) -> str:
    """The fingerprint of one day's archive snapshot: which objects, with which ETags and sizes.

    A report is valid for the exact snapshot it was computed from; any object added, replaced or
    removed under ``raw/<topic>/dt=<day>/`` changes this value (it is the raw archive's data version).
    """
    return files_fingerprint(archive_format.day_files(client, bucket, topic, day))


def files_fingerprint(files: list[dict]) -> str:
    """:func:`day_fingerprint` of a listing already made (``archive_format.day_files`` rows)."""
    triples = []
    for f in files:
        # a compacted object stands for the files it replaced: same records, same data version
        stands_for = f.get("fingerprint_as")
        triples += [(str(k), int(s), str(e)) for k, s, e in stands_for] if stands_for is not None else [
            (f["key"], int(f["size"]), str(f["etag"]))]
    return fingerprint(triples)


def fingerprint(files: list[tuple[str, int, str]]) -> str:
    """Order-independent digest of (key, size, etag) triples."""
    return hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:20]


def _days_objects(client: Any, bucket: str, topic: str) -> dict[str, list[dict]]:
    return layout.days_objects(client, bucket, topic)
