"""The report stats: ``stats.json`` next to each report, how every record of the day was accounted for.

The processor writes it with the report (:func:`write_stats`); the gate's accounting check and the
Dagster report asset read it (:func:`from_json`, :func:`read_stats`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from workers import s3 as s3_helpers
from workers.errors import KappaError


@dataclass(frozen=True)
class ReportStats:
    """Per-day record counters, summed over partitions: ``records = counted + dlq + duplicates + late``.

    Field order is the stored key order (``workers.pipelines.base.STAT_NAMES``), so the JSON stays
    byte-for-byte what the processor always wrote.
    """

    records: int
    counted: int
    dlq: int
    duplicates: int
    late: int

    @classmethod
    def of(cls, counts: dict[str, int]) -> ReportStats:
        """From the processor's counters (``processor.state.day_stats``); a missing outcome counted 0."""
        return cls(**{f.name: int(counts.get(f.name, 0)) for f in fields(cls)})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_NAMES = tuple(f.name for f in fields(ReportStats))


def to_json(stats: ReportStats) -> bytes:
    return json.dumps(stats.as_dict(), indent=1).encode()


def from_json(body: bytes | str) -> ReportStats:
    """Parse a stored ``stats.json``; a missing counter is an error (the processor writes all of them)."""
    doc: Any = json.loads(body)
    if not isinstance(doc, dict):
        raise KappaError(f"report stats are a JSON object, got {type(doc).__name__}")
    missing = [name for name in _NAMES if name not in doc]
    if missing:
        raise KappaError(f"report stats lack {', '.join(missing)}: recompute the report")
    return ReportStats(**{name: int(doc[name]) for name in _NAMES})


def write_stats(client: Any, bucket: str, key: str, stats: ReportStats) -> None:
    """Plain PUT: stats are deterministic for a finalized processor state, so any member may rewrite them."""
    client.put_object(Bucket=bucket, Key=key, Body=to_json(stats), ContentType="application/json")


def read_stats(client: Any, bucket: str, key: str) -> ReportStats | None:
    """The stats at ``key`` (None when absent). The gate reads the version it bound with ``from_json``."""
    body = s3_helpers.get_bytes(client, bucket, key)
    return None if body is None else from_json(body)
