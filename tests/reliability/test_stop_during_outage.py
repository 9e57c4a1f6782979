"""A stop (SIGTERM) while Kafka is down: every worker exits promptly and cleanly, and loses nothing.

A supervisor (systemd, Kubernetes, a user's Ctrl-C) stops workers when it likes, also during an
outage. The worker must not spend minutes retrying calls that cannot succeed: its S3 state is
written, its Kafka commits are given up (the next run resumes from S3 and from the last committed
transaction), and it exits 0 within ``STOP_BOUND_S``. The broker is then started again and a new
worker of the same kind finishes the work: the result equals the reference.

The fault lands: the worker was mid-stream when the broker stopped and logged that it saw it
before it was asked to stop.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from workers import keys
from workers.config import Settings
from workers.dev.stack import Stack

from .harness import (
    ARCHIVER_KILL_ARGS,
    DAY,
    KAFKA_DOWN_LINES,
    LIVE_KILL_ARGS,
    Worker,
    Workers,
    archive_all,
    archiver_progress,
    live_args,
    processor_progress,
    produce_orders,
    read_progress,
    wait_archived,
    wait_processor_caught_up,
    wait_until,
)
from .invariants import FIGURES, assert_archive_exact, assert_live_exact

#: how long a worker asked to stop during an outage may take to exit: its bounded consumer close
#: (``kafka.CLOSE_LIMIT_S``, 45 s) plus a little, never a retry window on top
STOP_BOUND_S = 60.0
#: orders v2 runs through the shuffle (two stages, both in one process); v1 is single-stage
SHUFFLED, SINGLE_STAGE = 2, 1


def stop_while_kafka_is_down(stack: Stack, worker: Worker, progress: Any, kind: str) -> float:
    """Stop the broker while ``worker`` is mid-stream, wait until it saw the outage, SIGTERM it;
    returns how long it took to exit (asserting it exited 0 within the bound)."""
    wait_until(lambda: read_progress(progress)[0] > 0, 120, f"{worker.name} to commit its first records")
    done, total = read_progress(progress)
    assert done < total, f"{worker.name} finished before the broker stopped ({done}/{total})"
    mark = len(worker.output())
    assert stack.down(["kafka"]) == ["kafka"], "kafka was not running"
    wait_until(lambda: KAFKA_DOWN_LINES.search(worker.output()[mark:]) or not worker.alive(), 60,
               f"{worker.name} to see that Kafka is down")
    assert worker.alive(), f"{worker.name} died while Kafka was down:\n{worker.tail()}"
    asked = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(STOP_BOUND_S + 120)  # measured past the bound, so a failure says how long it took
    took = time.monotonic() - asked
    FIGURES.fault(kind, service="kafka", done=done, total=total, stop_s=round(took, 1))
    print(f"[reliability] {kind}: exited {code} {took:.1f} s after SIGTERM, Kafka down")
    assert code == 0, f"{worker.name} did not stop cleanly:\n{worker.tail(120)}"
    assert took <= STOP_BOUND_S, f"{worker.name} took {took:.0f} s to stop:\n{worker.tail(120)}"
    return took


@pytest.mark.soak  # 0.2 s when it was written (its S3 retries already watched the stop): a guard, not a finding
def test_archiver_stops_promptly_while_kafka_is_down(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    produce_orders(private_settings, 15_000, 11, days=2)
    archiver = workers.start("archiver", *ARCHIVER_KILL_ARGS)
    try:
        stop_while_kafka_is_down(private_stack, archiver, archiver_progress(private_settings, private_s3),
                                 "stop_during_outage.archiver")
    finally:
        private_stack.up(["kafka"])
    again = workers.start("archiver-again", *ARCHIVER_KILL_ARGS)
    wait_archived(private_settings, private_s3, timeout=240, worker=again)
    again.signal(signal.SIGTERM)
    assert again.wait(90) == 0, again.tail()
    assert_archive_exact(private_settings, private_s3)


@pytest.mark.parametrize("version", [SINGLE_STAGE, SHUFFLED], ids=["single-stage", "shuffled"])
def test_live_processor_stops_promptly_while_kafka_is_down(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers, version: int
) -> None:
    produce_orders(private_settings, 8_000, 12, start=f"{DAY}T00:00:00Z")  # small batches: still mid-stream
    archive_all(workers)
    prefix, topic = keys.live_prefix("orders", version), private_settings.events_topic
    live = workers.start(f"live-v{version}", *live_args(version, base=LIVE_KILL_ARGS))
    try:
        stop_while_kafka_is_down(private_stack, live, processor_progress(private_settings, private_s3, prefix, topic),
                                 f"stop_during_outage.processor.live_v{version}")
    finally:
        private_stack.up(["kafka"])
    again = workers.start(f"live-v{version}-again", *live_args(version))
    wait_processor_caught_up(private_settings, private_s3, prefix, topic, timeout=240, worker=again)
    again.signal(signal.SIGTERM)
    assert again.wait(90) == 0, again.tail()
    assert_live_exact(private_settings, private_s3, version)
