"""``kafka.OffsetCommits`` on a real broker: asynchronous commits, answered through ``consume()``.

The workers' informational offset commits were synchronous. During a classic rebalance librdkafka
holds a commit until the rebalance completes, and the rebalance waits for the committing member to
poll: a member joining an archiver group stalled it for the whole ``--commit-timeout`` (30 s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Consumer, TopicPartition

from workers import kafka as kafka_helpers
from workers.config import Settings

MakeMember = Callable[[kafka_helpers.OffsetCommits], Consumer]


@pytest.fixture
def member(settings: Settings, unique: Callable[[str], str]) -> Iterator[MakeMember]:
    """A consumer of its own group whose commit answers go to the given tracker."""
    made: list[Consumer] = []

    def make(commits: kafka_helpers.OffsetCommits) -> Consumer:
        consumer = Consumer(settings.kafka_config(**{"group.id": unique("commits"), "enable.auto.commit": False,
                                                     **commits.config()}))
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close()


def poll_until_answered(consumer: Consumer, commits: kafka_helpers.OffsetCommits) -> None:
    for _ in range(60):
        consumer.consume(num_messages=1, timeout=0.5)
        if not commits.unanswered:
            return
    raise AssertionError(f"commits still unanswered after 30 s: {commits.pending()}")


def test_a_commit_is_answered_by_consume_and_lands(member, topic_factory) -> None:
    topic = topic_factory("commits", 2)
    commits = kafka_helpers.OffsetCommits(topic, limit=30)
    consumer = member(commits)
    commits.send(consumer, [TopicPartition(topic, 0, 7), TopicPartition(topic, 1, 0)], owned={0, 1})
    assert commits.pending() == {0: 7, 1: 0}, "sent without waiting for the answer"
    poll_until_answered(consumer, commits)
    assert commits.pending() == {} and commits.overdue() is None
    committed = consumer.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=30)
    assert [tp.offset for tp in committed] == [7, 0]


def test_a_failed_commit_goes_again_only_while_ours_and_not_superseded(member, topic_factory) -> None:
    """A partition the broker does not know fails its commit: kept for a retry, once a second at most,
    dropped once a newer offset was sent or the partition is no longer ours."""
    topic = topic_factory("commits", 1)
    commits = kafka_helpers.OffsetCommits(topic, limit=30)
    consumer = member(commits)
    commits.send(consumer, [TopicPartition(topic, 5, 9)], owned={0, 5})
    commits.send(consumer, [TopicPartition(topic, 0, 3)], owned={0, 5})
    poll_until_answered(consumer, commits)
    assert commits.failed == {5: 9}, "partition 5 does not exist: its commit must fail, and only its commit"
    assert commits.pending() == {5: 9}
    now = commits.retry_at + 0.001
    assert commits.take_failed(now) == {5: 9}
    commits.failed = {5: 9}
    assert commits.take_failed(now + 0.5) == {}, "retried once a second at most"

    commits.send(consumer, [TopicPartition(topic, 5, 11)], owned={5})
    assert commits.failed == {}, "a newer offset replaces the failed one"
    poll_until_answered(consumer, commits)
    assert commits.failed == {5: 11}

    commits.retry_at = 0.0
    commits.send(consumer, [], owned={0})
    assert commits.pending() == {}, "a partition no longer ours is not committed again"


def test_a_commit_left_unanswered_is_overdue_and_carried_to_the_next_consumer(member, topic_factory) -> None:
    """Nothing polls, so nothing is answered: past ``limit`` the commit counts as stuck, and a
    replacement tracker (a new consumer) sends its offsets again."""
    topic = topic_factory("commits", 1)
    commits = kafka_helpers.OffsetCommits(topic, limit=5)
    consumer = member(commits)
    commits.send(consumer, [TopicPartition(topic, 0, 4)], owned={0})
    sent_at = commits.unanswered[0][0]
    assert commits.overdue(sent_at + 4) is None
    assert commits.overdue(sent_at + 6) == "an offset commit did not return within 5s"

    successor = kafka_helpers.OffsetCommits(topic, limit=5, carried=commits.pending())
    replacement = member(successor)
    successor.send(replacement, [], owned={0})
    poll_until_answered(replacement, successor)
    [committed] = replacement.committed([TopicPartition(topic, 0)], timeout=30)
    assert committed.offset == 4
