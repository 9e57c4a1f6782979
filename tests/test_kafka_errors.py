"""Which Kafka errors the workers retry in place (``kafka.is_transient``) and which they must not.

A retry loop around a transactional call that sees an abortable error can never succeed: the
producer sits in its abortable state and answers every later call with an invalid-state error,
which is neither retriable nor abortable, so the worker would stop instead of aborting and redoing.
"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from workers import kafka as kafka_helpers


@pytest.mark.parametrize(
    "error",
    [
        KafkaError(KafkaError._TIMED_OUT),  # committed() right after a broker restart: not flagged retriable
        KafkaError(KafkaError._TRANSPORT),
        KafkaError(KafkaError.UNKNOWN_LEADER_EPOCH),
        KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, retriable=True),
        # committed() after a broker restart, as confluent-kafka raises them: not flagged retriable
        KafkaError(KafkaError.NOT_COORDINATOR),
        KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE),
        KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS),
    ],
    ids=["timed-out", "transport", "leader-epoch", "flagged-retriable", "not-coordinator", "coordinator-unavailable",
         "coordinator-loading"],
)
def test_transient_errors_are_retried(error: KafkaError) -> None:
    assert kafka_helpers.is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        KafkaError(KafkaError._TIMED_OUT, txn_requires_abort=True),
        KafkaError(KafkaError._TRANSPORT, retriable=True, txn_requires_abort=True),
        KafkaError(KafkaError._FENCED, fatal=True),
        KafkaError(KafkaError._TIMED_OUT, fatal=True),
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
        KafkaError(KafkaError._STATE),
    ],
    ids=["abortable-timeout", "abortable-retriable", "fenced", "fatal-timeout", "authorization", "invalid-state"],
)
def test_doomed_or_permanent_errors_are_not_retried(error: KafkaError) -> None:
    assert not kafka_helpers.is_transient(error)
