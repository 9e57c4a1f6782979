"""Produce merged archive rows to the replay topic: byte-exact, with the source position in headers."""

from __future__ import annotations

import time
import zlib
from typing import Any

import polars as pl
from confluent_kafka import KafkaError, Producer

from workers.config import Settings
from workers.errors import KappaError

SRC_PARTITION_HEADER = "kappa.src.partition"
SRC_OFFSET_HEADER = "kappa.src.offset"
PRODUCER_TUNING: dict[str, object] = {
    "enable.idempotence": True,  # ordered, no duplicates on retry
    "acks": "all",
    "linger.ms": 50,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    "delivery.report.only.error": True,  # per-record Python callbacks only when something fails
    # replay what the source topic accepted: librdkafka's 1 MB default refused a 4 MiB archived record
    # at produce time (found by the end-to-end fuzz); the broker still enforces the topic's own limit
    "message.max.bytes": 64 * 1024 * 1024,
}


def target_partition(key: bytes | None, source_partition: int, partitions: int | None) -> int:
    """Source mode (``partitions`` None): the original partition. Key mode: crc32(key) % partitions."""
    if partitions is None:
        return source_partition
    if key is None:
        return source_partition % partitions
    return zlib.crc32(key) % partitions


def row_headers(frame: pl.DataFrame) -> list[list[tuple[str, bytes | None]]]:
    """Per row: the original headers (order and bytes kept), then the ``kappa.src.*`` headers.

    The source partition/offset values are built as a column; only rows that carry original headers
    (usually a minority) go through a per-header Python step.
    """
    src = frame.select(
        pl.col("partition").cast(pl.String).cast(pl.Binary).alias("p"),
        pl.col("offset").cast(pl.String).cast(pl.Binary).alias("o"),
    )
    headers = [
        [(SRC_PARTITION_HEADER, p), (SRC_OFFSET_HEADER, o)]
        for p, o in zip(src["p"].to_list(), src["o"].to_list(), strict=True)
    ]
    flat = (
        frame.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), "headers")
        .filter(pl.col("headers").list.len() > 0)
        .explode("headers")
        .unnest("headers")
    )
    if flat.height:
        originals: dict[int, list[tuple[str, bytes | None]]] = {}
        columns = (flat["_row"].to_list(), flat["key"].to_list(), flat["value"].to_list())
        for row, name, value in zip(*columns, strict=True):
            originals.setdefault(row, []).append((name, value))
        for row, original in originals.items():
            headers[row] = original + headers[row]
    return headers


class ReplayProducer:
    """Produces merged batches byte-exact with source headers; fails on the first delivery error."""

    def __init__(self, settings: Settings, topic: str, partitions: int | None, throttle: float | None) -> None:
        self.topic = topic
        self.partitions = partitions
        self.throttle = throttle
        self.errors: list[str] = []
        self.produced = 0
        self.started = time.monotonic()
        self.producer = Producer(settings.kafka_config(**PRODUCER_TUNING, on_delivery=self._on_delivery))

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None and len(self.errors) < 10:
            self.errors.append(err.str())

    def _raise_if_failed(self) -> None:
        if self.errors:
            raise KappaError(f"replay produce to {self.topic} failed: {'; '.join(self.errors)}")

    def produce_frame(self, frame: pl.DataFrame) -> None:
        step = max(1, int(self.throttle / 10)) if self.throttle else frame.height
        for start in range(0, frame.height, step):
            self._produce_rows(frame.slice(start, step))
            self._throttle()
        self._raise_if_failed()

    def _produce_rows(self, frame: pl.DataFrame) -> None:
        """One ``produce()`` per row; everything else (target partitions, header values) is vectorised.

        Arguments by position, in the order of confluent-kafka's signature (topic, value, key,
        partition, callback, on_delivery, timestamp, headers): matching keywords cost ~1.2 of ~3.4 us a
        call in a micro-benchmark. The byte-exact load tests catch a client that changed the order."""
        keys_, values, stamps = frame["key"].to_list(), frame["value"].to_list(), frame["_ts"].to_list()
        targets = self._targets(frame).to_list()
        produce, topic = self.producer.produce, self.topic
        for key, value, ts, target, headers in zip(keys_, values, stamps, targets, row_headers(frame), strict=True):
            try:
                produce(topic, value, key, target, None, None, ts, headers)
            except BufferError:
                while True:
                    self.producer.poll(0.05)
                    try:
                        produce(topic, value, key, target, None, None, ts, headers)
                        break
                    except BufferError:
                        continue
        self.producer.poll(0)
        self.produced += frame.height

    def _targets(self, frame: pl.DataFrame) -> pl.Series:
        """:func:`target_partition` of every row, with one crc32 per distinct key (not per row)."""
        if self.partitions is None:
            return frame["partition"]
        distinct = frame["key"].drop_nulls().unique()
        lookup = pl.DataFrame(
            {"key": distinct, "_target": [zlib.crc32(k) % self.partitions for k in distinct.to_list()]},
            schema={"key": pl.Binary, "_target": pl.Int64},
        )
        joined = frame.select("key", "partition").join(lookup, on="key", how="left", maintain_order="left")
        return joined.select(pl.coalesce("_target", pl.col("partition").cast(pl.Int64) % self.partitions))[
            "_target"
        ]

    def _throttle(self) -> None:
        if self.throttle:
            ahead = self.produced / self.throttle - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        remaining = self.producer.flush(120)
        if remaining:
            self.errors.append(f"{remaining} records not delivered within 120s")
        self._raise_if_failed()


