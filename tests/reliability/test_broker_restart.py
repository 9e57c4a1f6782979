"""Broker restart (private stack, Kafka only): running workers reconnect and finish on their own.

The broker is stopped while the worker is mid-stream, kept down for a few seconds and started again;
nobody restarts the worker. The test only waits (bounded) for the worker to reach the end.
"""

from __future__ import annotations

import signal
from typing import Any

from workers.config import Settings
from workers.stack import Stack

from .harness import (
    ARCHIVER_ARGS,
    DAY,
    Workers,
    archive_all,
    bounded_args,
    load_args,
    outage,
    produce_orders,
    replay_spec,
    wait_archived,
    wait_until,
)
from .invariants import assert_archive_exact, assert_dlq_exact, assert_replay_topic_exact, assert_reports_exact

DOWN_SECONDS = 5.0


def test_archiver_survives_broker_restart(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """Live archiver keeps running across a broker restart and archives what came before and after."""
    produce_orders(private_settings, 20_000, 1, days=2)
    archiver = workers.start("archiver", *ARCHIVER_ARGS)
    wait_until(lambda: "assigned" in archiver.output(), 60, "the archiver to get its partitions")
    outage(private_stack, "kafka", DOWN_SECONDS, "broker_restart.archive")
    assert archiver.alive(), f"the archiver died during the broker restart:\n{archiver.tail()}"
    produce_orders(private_settings, 10_000, 2, days=2)
    wait_archived(private_settings, private_s3)
    archiver.signal(signal.SIGTERM)
    assert archiver.wait(90) == 0, archiver.tail()
    assert_archive_exact(private_settings, private_s3)


def test_replay_survives_broker_restarts(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """Broker restarted while the loader produces, then while the bounded processor consumes: both finish."""
    produce_orders(private_settings, 20_000, 3, start=f"{DAY}T00:00:00Z")
    archive_all(workers)
    spec = replay_spec(private_settings)
    loader = workers.start("load", *load_args(spec), "--throttle", "3000")
    wait_until(lambda: "produce:" in loader.output(), 60, "the loader to start producing")
    outage(private_stack, "kafka", DOWN_SECONDS, "broker_restart.replay_load")
    assert loader.wait(240) == 0, f"the loader did not finish after the broker came back:\n{loader.tail()}"
    bounded = workers.start("bounded", *bounded_args(spec, batch_size=100))
    wait_until(lambda: "records=" in bounded.output(), 60, "the bounded processor to consume")
    outage(private_stack, "kafka", DOWN_SECONDS, "broker_restart.replay_consume")
    assert bounded.wait(240) == 0, f"the bounded processor did not finish:\n{bounded.tail()}"
    assert_archive_exact(private_settings, private_s3)
    assert_replay_topic_exact(private_settings, private_s3, private_settings.events_topic, spec.topic, spec.day)
    assert_reports_exact(private_settings, private_s3, 2, [spec.day])
    assert_dlq_exact(private_settings, private_s3, spec.dlq_topic, spec.day)


def test_fresh_kraft_cluster_id_is_never_read_as_an_option() -> None:
    """Regression: ids starting with '-' made `kafka-storage format -t <id>` fail on 1 fresh start in 64."""
    from workers.stack import cluster_id

    ids = [cluster_id() for _ in range(5000)]
    assert not [cid for cid in ids if cid.startswith("-")]
    assert len(set(ids)) == len(ids)
