"""Dead-letter topic: size from watermarks, reasons from the headers of its newest records.

The reader assigns partitions explicitly (no group membership, so no rebalance of anyone) and never
commits: the dashboard stays invisible to the workers. It starts :data:`TAIL` records before the end
of each partition and then follows new records, with a per-call budget so a flood of bad records
never stalls a refresh.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from workers.config import Settings

#: Records per partition read back when the dashboard starts.
TAIL = 2_000
#: Records read per refresh at most, over all partitions.
BUDGET = 20_000
TOP_REASONS = 8
MAX_REASON_CHARS = 90


def reason_of(headers: list[tuple[str, bytes | None]] | None) -> str:
    """The value of the first header whose name contains ``reason`` (the processor's reason header)."""
    for name, value in headers or ():
        if "reason" in name.lower() and value is not None:
            text = value.decode("utf-8", errors="replace").strip()
            return text[:MAX_REASON_CHARS] or "(empty reason)"
    return "(no reason header)"


class DlqTail:
    """Follows the DLQ topic's newest records and tallies their reasons."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.consumer = Consumer(
            settings.kafka_config(
                **{
                    "group.id": "kappa.dashboard.dlq-tail",  # required by librdkafka; never joined
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "log_level": 0,
                }
            )
        )
        self.next: dict[int, int] = {}  # partition -> next offset to read
        self.reasons: Counter[str] = Counter()
        self.read = 0

    def watermarks(self) -> dict[int, tuple[int, int]]:
        """``{partition: (low, high)}``; empty when the topic does not exist yet."""
        info = self.consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
        if info is None or info.error is not None:
            return {}
        return {
            p: self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=5) for p in info.partitions
        }

    def _assign_new(self, marks: dict[int, tuple[int, int]]) -> None:
        new = [
            TopicPartition(self.topic, p, max(low, high - TAIL))
            for p, (low, high) in marks.items()
            if p not in self.next
        ]
        if new:
            self.consumer.incremental_assign(new)
            self.next.update({tp.partition: tp.offset for tp in new})

    def _behind(self, marks: dict[int, tuple[int, int]]) -> bool:
        return any(self.next[p] < high for p, (_low, high) in marks.items() if p in self.next)

    def refresh(self) -> dict[str, Any]:
        """Read what arrived since the last call (up to :data:`BUDGET`) and return the tallies."""
        marks = self.watermarks()
        self._assign_new(marks)
        budget = BUDGET
        while budget > 0 and self._behind(marks):
            batch = self.consumer.consume(num_messages=min(1000, budget), timeout=0.5)
            if not batch:
                break
            budget -= len(batch)
            for message in batch:
                if message.error() is None:
                    self.next[message.partition()] = message.offset() + 1
                    self.read += 1
                    self.reasons[reason_of(message.headers())] += 1
        return {
            "topic": self.topic,
            "records": sum(high - low for low, high in marks.values()),
            "sampled": self.read,
            "reasons": [{"reason": r, "count": n} for r, n in self.reasons.most_common(TOP_REASONS)],
        }

    def close(self) -> None:
        self.consumer.close()
