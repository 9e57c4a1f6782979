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

import dataclasses
import math
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

#: how long a worker asked to stop during an outage may take to exit: one bounded try of its last
#: checkpoint or transaction, then its consumer close (``engine.STOP_CLOSE_S``, 15 s), never a retry
#: window on top
STOP_BOUND_S = 60.0
#: orders v2 runs through the shuffle (two stages, both in one process); v1 is single-stage
SHUFFLED, SINGLE_STAGE = 2, 1


@dataclasses.dataclass
class Stopping:
    """One worker of the outage: its durable progress (mid-stream before the stop) and its figure's kind."""

    worker: Worker
    progress: Any
    kind: str
    #: where its log stood, and its (done, total) progress, just before the broker stopped
    mark: int = 0
    before: tuple[int, int] = (0, 0)

    def started(self) -> bool:
        return read_progress(self.progress)[0] > 0

    def saw_outage(self) -> bool:
        return bool(KAFKA_DOWN_LINES.search(self.worker.output()[self.mark:])) or not self.worker.alive()


def stop_while_kafka_is_down(stack: Stack, members: list[Stopping]) -> None:
    """Stop the broker while every worker is mid-stream, wait until each saw the outage, SIGTERM them
    together; each must exit 0 within the bound (its time is measured and recorded)."""
    for member in members:
        worker = member.worker
        wait_until(member.started, 120, f"{worker.name} to commit its first records")
        member.before = done, total = read_progress(member.progress)
        assert done < total, f"{worker.name} finished before the broker stopped ({done}/{total})"
        member.mark = len(worker.output())
    assert stack.down(["kafka"]) == ["kafka"], "kafka was not running"
    for member in members:
        worker = member.worker
        wait_until(member.saw_outage, 60, f"{worker.name} to see that Kafka is down")
        assert worker.alive(), f"{worker.name} died while Kafka was down:\n{worker.tail()}"
    asked = time.monotonic()
    for member in members:
        member.worker.signal(signal.SIGTERM)
    exited: dict[str, float] = {}
    while len(exited) < len(members) and time.monotonic() - asked < STOP_BOUND_S + 120:  # a failure says how long
        exited |= {m.worker.name: time.monotonic() - asked for m in members
                   if m.worker.name not in exited and not m.worker.alive()}
        time.sleep(0.1)
    for member in members:
        worker, took = member.worker, exited.get(member.worker.name, math.inf)
        done, total = member.before
        code = worker.wait(1)
        FIGURES.fault(member.kind, service="kafka", done=done, total=total, stop_s=round(took, 1))
        print(f"[reliability] {member.kind}: exited {code} {took:.1f} s after SIGTERM, Kafka down")
        assert code == 0, f"{worker.name} did not stop cleanly:\n{worker.tail(120)}"
        assert took <= STOP_BOUND_S, f"{worker.name} took {took:.0f} s to stop:\n{worker.tail(120)}"


@pytest.mark.soak  # 0.2 s when it was written (its S3 retries already watched the stop): a guard, not a finding
def test_archiver_stops_promptly_while_kafka_is_down(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    produce_orders(private_settings, 15_000, 11, days=2)
    archiver = workers.start("archiver", *ARCHIVER_KILL_ARGS)
    try:
        progress = archiver_progress(private_settings, private_s3)
        stop_while_kafka_is_down(private_stack, [Stopping(archiver, progress, "stop_during_outage.archiver")])
    finally:
        private_stack.up(["kafka"])
    again = workers.start("archiver-again", *ARCHIVER_KILL_ARGS)
    wait_archived(private_settings, private_s3, timeout=240, worker=again)
    again.signal(signal.SIGTERM)
    assert again.wait(90) == 0, again.tail()
    assert_archive_exact(private_settings, private_s3)


def test_live_processors_stop_promptly_while_kafka_is_down(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """Both processor kinds in one outage: the single-stage one (orders v1, dead letters pending) and the
    shuffled one (orders v2: stage 1's transaction and stage 2), each in its own group."""
    produce_orders(private_settings, 8_000, 12, start=f"{DAY}T00:00:00Z")  # small batches: still mid-stream
    archive_all(workers)
    topic, members = private_settings.events_topic, []
    for version in (SINGLE_STAGE, SHUFFLED):
        live = workers.start(f"live-v{version}", *live_args(version, base=LIVE_KILL_ARGS))
        progress = processor_progress(private_settings, private_s3, keys.live_prefix("orders", version), topic)
        members.append(Stopping(live, progress, f"stop_during_outage.processor.live_v{version}"))
    try:
        stop_while_kafka_is_down(private_stack, members)
    finally:
        private_stack.up(["kafka"])
    for version in (SINGLE_STAGE, SHUFFLED):
        again = workers.start(f"live-v{version}-again", *live_args(version))
        wait_processor_caught_up(private_settings, private_s3, keys.live_prefix("orders", version), topic,
                                 timeout=240, worker=again)
        again.signal(signal.SIGTERM)
        assert again.wait(90) == 0, again.tail()
        assert_live_exact(private_settings, private_s3, version)
