"""One ``consume()`` call holds at most what ``ConsumeBudget`` allows, on a real broker.

librdkafka's prefetch cap bounds its queue, not a call: ``consume(n, timeout)`` keeps taking
messages off the queue, which librdkafka refills meanwhile, until it holds ``n``. Stage 2 of the
shuffle asked for 20,000 of its ~1 MiB frames and one call took the whole backlog (2.2 GiB).
"""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Consumer, Producer

from workers import kafka as kafka_helpers
from workers.config import Settings

VALUE_BYTES = 512 * 1024
MESSAGES = 80  # 40 MiB: over twice the budget


def bulk_consumer(settings: Settings, topic: str, group: str) -> Consumer:
    consumer = Consumer(settings.kafka_config(**{
        **kafka_helpers.BULK_CONSUMER_TUNING, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "queued.max.messages.kbytes": 16 * 1024,
    }))
    consumer.subscribe([topic])
    return consumer


def read_all(consumer: Consumer, count: Callable[[], int], seen: Callable[[list], None]) -> list[int]:
    """Sizes (bytes) of every non-empty consume() result until all messages are read."""
    sizes, read = [], 0
    for _ in range(200):
        messages = [m for m in consumer.consume(num_messages=count(), timeout=3.0) if m.error() is None]
        seen(messages)
        if messages:
            sizes.append(sum(len(m.value()) for m in messages))
            read += len(messages)
        if read >= MESSAGES:
            break
    assert read == MESSAGES
    return sizes


def test_consume_results_stay_within_the_budget(settings: Settings, topic_factory, unique) -> None:
    topic = topic_factory("budget", partitions=1)
    producer = Producer(settings.kafka_config(**{"compression.type": "lz4", "linger.ms": 5}))
    for n in range(MESSAGES):
        producer.produce(topic, value=bytes([n % 251]) * VALUE_BYTES, partition=0)
    assert producer.flush(30) == 0

    plain = bulk_consumer(settings, topic, unique("plain"))
    try:  # the fault: one call of the old kind holds far more than the prefetch cap
        unbounded = read_all(plain, lambda: 20_000, lambda _: None)
    finally:
        plain.close()
    assert max(unbounded) > 2 * kafka_helpers.CONSUME_BYTES, unbounded

    budget = kafka_helpers.ConsumeBudget(20_000)
    bounded = bulk_consumer(settings, topic, unique("budget"))
    try:
        sizes = read_all(bounded, budget.messages, budget.observe)
    finally:
        bounded.close()
    assert max(sizes) <= kafka_helpers.CONSUME_BYTES, sizes
    assert budget.messages() == kafka_helpers.CONSUME_BYTES // VALUE_BYTES
