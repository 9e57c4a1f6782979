"""Consumer-group lag from offsets only: committed offsets (AdminClient) vs the topic's watermarks.

Dashboards, ``kappa replay status`` and progress sensors must observe groups without joining
them: joining would trigger a rebalance of the real workers, and committing would move their
position. Everything here reads metadata; nothing consumes a record or commits an offset.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from workers.config import Settings
from workers.kafka import admin_client, retrying

#: librdkafka's "no committed offset" sentinel (OFFSET_INVALID).
NO_OFFSET = -1001


@dataclass(frozen=True)
class GroupLag:
    """How far one group is behind on one topic; ``committed`` is None when it never committed."""

    group: str
    topic: str
    end: dict[int, int]
    committed: dict[int, int | None]

    @property
    def end_total(self) -> int:
        return sum(self.end.values())

    @property
    def consumed(self) -> int:
        """Records behind the group's committed position, summed over partitions."""
        return sum(min(c, self.end.get(p, c)) for p, c in self.committed.items() if c is not None)

    @property
    def lag(self) -> int:
        return sum(max(end - (self.committed.get(p) or 0), 0) for p, end in self.end.items())

    @property
    def percent_done(self) -> float:
        """Share of the end offsets behind the committed position (an empty topic is done)."""
        return 100.0 if not self.end_total else round(100.0 * self.consumed / self.end_total, 2)

    @property
    def started(self) -> bool:
        return any(c is not None for c in self.committed.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "group": self.group,
            "topic": self.topic,
            "lag": self.lag,
            "consumed": self.consumed,
            "end": self.end_total,
            "started": self.started,
            "partitions": {
                str(p): {"end": end, "committed": self.committed.get(p)} for p, end in sorted(self.end.items())
            },
        }


class LagReader:
    """One AdminClient reused across calls (a dashboard asks every few seconds)."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.admin: AdminClient = admin_client(settings, quiet=True)
        self.timeout = timeout

    def partitions(self, topic: str) -> list[int] | None:
        """Partition ids of ``topic``, or None when it does not exist (e.g. a cleaned-up replay topic)."""
        info = self.admin.list_topics(topic, timeout=self.timeout).topics.get(topic)
        if info is None or info.error is not None:
            return None
        return sorted(info.partitions)

    def end_offsets(self, topic: str) -> dict[int, int] | None:
        """High watermark per partition (the offset the next record gets), None if no such topic."""
        parts = self.partitions(topic)
        if parts is None:
            return None
        request = {TopicPartition(topic, p): OffsetSpec.latest() for p in parts}
        futures = self.admin.list_offsets(request, request_timeout=self.timeout)
        return {tp.partition: future.result().offset for tp, future in futures.items()}

    def committed(self, group: str, topic: str, partitions: list[int]) -> dict[int, int | None]:
        """The group's committed offset per partition of ``topic`` (None = never committed).

        A group that never committed answers with no offsets, not an error. An error is never read as
        "never committed": that showed a finished replay at 0 % while its coordinator was still loading
        after a broker start. A transient one (``kafka.retrying``) is asked again within ``timeout``;
        anything else (a denied group, a broker that stays away) raises."""
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
        result = retrying(
            lambda: self.admin.list_consumer_group_offsets([request], request_timeout=self.timeout)[group].result(),
            self.timeout,
        )
        return {
            tp.partition: (None if tp.offset < 0 or tp.error is not None else tp.offset)
            for tp in result.topic_partitions
        }

    def group_lag(self, group: str, topic: str, end: dict[int, int] | None = None) -> GroupLag | None:
        """Lag of ``group`` on ``topic`` against ``end`` (default: the current watermarks)."""
        if end is None:
            end = self.end_offsets(topic)
        if end is None:
            return None
        return GroupLag(group, topic, end, self.committed(group, topic, sorted(end)))
