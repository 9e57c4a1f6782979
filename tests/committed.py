"""A group's committed offsets, read without joining it: what several tests check a worker against."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from workers import kafka as kafka_helpers
from workers.config import Settings


def committed_offsets(settings: Settings, group: str, topic: str, partitions: list[int], *, stable: bool = True,
                      timeout: float = 60.0) -> dict[int, int]:
    """``{partition: committed offset}`` (-1001 where the group has none).

    ``stable=False`` reads the offsets committed so far instead of waiting for stable ones (librdkafka
    asks the broker for stable offsets, which blocks while a killed member's transaction holds them).
    A coordinator still loading or moving (NOT_COORDINATOR on a freshly started broker: the first group
    call of a test run) is waited out, as the workers wait it out (``kafka.retrying``)."""
    isolation = "read_committed" if stable else "read_uncommitted"
    consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False,
                                                 "isolation.level": isolation}))
    try:
        found = kafka_helpers.retrying(
            lambda: consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10), timeout
        )
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in found}
