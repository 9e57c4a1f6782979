"""Replay progress from offsets only: committed offsets of the replay group vs the manifest's end offsets."""

from __future__ import annotations

from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition

from workers import kafka as kafka_helpers
from workers.config import Settings


def committed_offsets(settings: Settings, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """The group's committed offset per partition (0 when nothing is committed). Never consumes."""
    admin = kafka_helpers.admin_client(settings)
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
    try:
        result = admin.list_consumer_group_offsets([request], request_timeout=15)[group].result()
    except KafkaException:
        return dict.fromkeys(partitions, 0)
    return {tp.partition: max(tp.offset, 0) for tp in result.topic_partitions}


def progress(settings: Settings, manifest: dict[str, Any]) -> dict[str, Any]:
    """Lag and percent done of one replay."""
    end = {int(p): int(o) for p, o in manifest["end_offsets"].items()}
    committed = committed_offsets(settings, manifest["group"], manifest["replay_topic"], sorted(end))
    lag = sum(max(0, end[p] - min(committed.get(p, 0), end[p])) for p in end)
    total = sum(end.values())
    return {
        "lag": lag,
        "total": total,
        "done": total - lag,
        "percent_done": 100.0 if total == 0 else round(100.0 * (total - lag) / total, 2),
        "committed": {str(p): committed.get(p, 0) for p in sorted(end)},
    }
