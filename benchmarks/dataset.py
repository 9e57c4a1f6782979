"""Benchmark input: the generator's `orders` events for one UTC day, padded to a realistic size.

The generator's events are ~82 bytes of JSON; real events carry more context. Each value gets
extra fields the pipelines ignore (``session_id``, ``ip``, ``page``), sized so the mean value is
``value_bytes`` (default 200, each value within +-20%). Keys, headers and timestamps are the
generator's. No faults by default (so Quix Streams and our processor must agree exactly).
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic

from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.dev.generator import PRODUCER_CONFIG, Faults, generate

#: Bench topics never expire (events are dated yesterday) and are deleted by the benchmark itself.
TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1", "message.timestamp.type": "CreateTime"}
PAGES = ("/", "/search", "/cart", "/checkout", "/account/orders", "/products/", "/category/", "/deals/today")
WORDS = (
    "red", "blue", "green", "black", "white", "small", "large", "running", "shoes", "jacket", "shirt",
    "organic", "coffee", "tea", "mug", "lamp", "desk", "chair", "phone", "case", "cable", "charger",
    "wireless", "headphones", "kids", "summer", "winter", "sale", "new", "classic", "premium", "pack", "set",
)


def bench_day(now: dt.datetime | None = None) -> str:
    """Yesterday (UTC): inside Dagster's daily partitions, and a complete day."""
    now = now or dt.datetime.now(dt.UTC)
    return str((now - dt.timedelta(days=1)).date())


def day_start_ms(day: str) -> int:
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp() * 1000)


def pad(value: bytes, target: int, rng: random.Random) -> bytes:
    """``{..."amount":1.5}`` -> ``{..."amount":1.5,"session_id":"..","ip":"..","page":".."}`` of ~target bytes."""
    extra = b',"session_id":"%016x","ip":"10.%d.%d.%d","page":"' % (
        rng.getrandbits(64), rng.randrange(256), rng.randrange(256), rng.randrange(256)
    )
    page = rng.choice(PAGES).encode()
    want = int(target * rng.uniform(0.8, 1.2)) - len(value) - len(extra) - len(page) - 2
    words: list[str] = []
    while want > 0:
        words.append(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randrange(10_000)))
        want -= len(words[-1]) + 1
    page += "-".join(words).encode()
    return value[:-1] + extra + page + b'"}'


@dataclass
class Dataset:
    topic: str
    day: str
    records: int
    partitions: int
    value_bytes_total: int
    key_bytes_total: int
    users: int
    seconds: float

    @property
    def mean_value_bytes(self) -> float:
        return self.value_bytes_total / max(self.records, 1)

    def as_dict(self) -> dict:
        return {**self.__dict__, "mean_value_bytes": round(self.mean_value_bytes, 1)}


def create_topic(settings: Settings, topic: str, partitions: int) -> None:
    admin = kafka_helpers.admin_client(settings)
    new = NewTopic(topic, num_partitions=partitions, replication_factor=-1, config=TOPIC_CONFIG)
    admin.create_topics([new], operation_timeout=30, request_timeout=30)[topic].result()


def produce(
    settings: Settings,
    topic: str,
    records: int,
    *,
    day: str,
    partitions: int = 6,
    value_bytes: int = 200,
    users: int = 1000,
    seed: int = 7,
    progress: Callable[[int, float], None] | None = None,
) -> Dataset:
    """Create ``topic`` and fill it with ``records`` events spread over ``day`` (event time = Kafka time)."""
    create_topic(settings, topic, partitions)
    producer = Producer(settings.kafka_config(**PRODUCER_CONFIG))
    rng = random.Random(seed + 1)
    start = day_start_ms(day) + 1_000  # generator jitter is < 1 s: every record stays inside the day
    span = 86_400_000 - 2_000
    values = keys = 0
    started = last = time.monotonic()
    faults = Faults()
    for index, record in enumerate(generate(records, start_ms=start, span_ms=span, seed=seed, faults=faults,
                                            users=users)):
        value = pad(record.value, value_bytes, rng) if value_bytes and record.value else record.value
        values += len(value or b"")
        keys += len(record.key or b"")
        while True:
            try:
                producer.produce(topic, value=value, key=record.key, timestamp=record.timestamp_ms,
                                 headers=record.headers or None)
                break
            except BufferError:
                producer.poll(0.05)
        if index % 1000 == 0:
            producer.poll(0)
            now = time.monotonic()
            if progress and now - last > 5:
                progress(index, now - started)
                last = now
    remaining = producer.flush(300)
    if remaining:
        raise RuntimeError(f"{remaining} bench records were not delivered to {topic}")
    return Dataset(topic, day, records, partitions, values, keys, users, time.monotonic() - started)


def write_payload_file(settings: Settings, topic: str, path: Path, samples: int = 20_000) -> int:
    """Sample values of ``topic`` into a newline-delimited file for ProducerPerformance; returns the count."""
    from confluent_kafka import Consumer

    consumer = Consumer(settings.kafka_config(**{
        "group.id": f"bench.payload.{time.time_ns()}", "enable.auto.commit": False, "auto.offset.reset": "earliest",
    }))
    consumer.subscribe([topic])
    lines: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(lines) < samples and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=1.0):
                value = message.value() if message.error() is None else None
                if value and b"\n" not in value:
                    lines.append(value)
    finally:
        consumer.close()
    path.write_bytes(b"\n".join(lines[:samples]) + b"\n")
    return min(len(lines), samples)


def delete_topics(settings: Settings, topics: list[str]) -> None:
    existing = set(kafka_helpers.admin_client(settings).list_topics(timeout=30).topics)
    kafka_helpers.delete_topics(settings, [t for t in topics if t in existing])


def topics_with_prefix(settings: Settings, prefix: str) -> list[str]:
    return sorted(t for t in kafka_helpers.admin_client(settings).list_topics(timeout=30).topics if prefix in t)


def delete_bucket(settings: Settings, bucket: str) -> None:
    """Delete every object of ``bucket`` (a bench bucket) and the bucket itself."""
    client = s3_helpers.s3_client(settings)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:
        return
    batch: list[dict] = []
    for obj in s3_helpers.iter_keys(client, bucket, ""):
        batch.append({"Key": obj["Key"]})
        if len(batch) == 1000:
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
            batch = []
    if batch:
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
    client.delete_bucket(Bucket=bucket)
