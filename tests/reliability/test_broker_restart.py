"""Broker restart (private stack, Kafka only): running workers reconnect and finish on their own.

The broker is stopped while the worker is mid-stream (its durable progress, read from S3 or the
replay topic, shows some but not all records done), kept down for a few seconds and started again;
the worker must have logged connection errors meanwhile. Nobody restarts the worker: the test only
waits (bounded) for it to reach the end.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
from typing import Any

import pytest

from workers import keys
from workers.config import Settings
from workers.dev.stack import Stack
from workers.kafka import end_offsets

from .harness import (
    ARCHIVER_KILL_ARGS,
    DAY,
    FAULTY,
    KAFKA_DOWN_LINES,
    LIVE_KILL_ARGS,
    Worker,
    Workers,
    archive_all,
    archiver_progress,
    bounded_args,
    freeze,
    group_committed,
    live_args,
    load_args,
    outage,
    processor_progress,
    produce_orders,
    read_progress,
    rejoins,
    replay_spec,
    topic_progress,
    wait_archived,
    wait_processor_caught_up,
    wait_until,
)
from .invariants import (
    FIGURES,
    archive_records,
    assert_archive_exact,
    assert_dlq_exact,
    assert_live_exact,
    assert_replay_topic_exact,
    assert_reports_exact,
)

DOWN_SECONDS = 5.0
#: static members (group.instance.id): the ones a broker restart can fence by their own re-join. Their
#: session is the shortest allowed and the broker stays down longer than it, so the restart always costs
#: the member its session (librdkafka's own session check revokes the assignment): the fault lands every run.
SESSION_SECONDS = 6
STATIC = ("--instance-id", "auto", "--session-timeout", str(SESSION_SECONDS))
STATIC_DOWN_SECONDS = SESSION_SECONDS + 4.0
#: orders v2 runs through the shuffle (two stages, both in one process); v1 is single-stage
SHUFFLED, SINGLE_STAGE = 2, 1


def started_some(progress: Any, what: str) -> None:
    """Bounded wait until ``progress`` shows at least one record done: the worker is streaming."""
    wait_until(lambda: read_progress(progress)[0] > 0, 120, what)


def test_archiver_survives_broker_restart(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """Live archiver keeps running across a broker restart and archives what came before and after."""
    produce_orders(private_settings, 15_000, 1, days=2)
    archiver = workers.start("archiver", *ARCHIVER_KILL_ARGS)  # small flushes: seconds of work, stopped mid-way
    progress = archiver_progress(private_settings, private_s3)
    started_some(progress, "the archiver to archive its first records")
    outage(private_stack, "kafka", DOWN_SECONDS, "broker_restart.archiver", archiver, KAFKA_DOWN_LINES, progress)
    produce_orders(private_settings, 5_000, 2, days=2)
    wait_archived(private_settings, private_s3, timeout=240, worker=archiver)
    archiver.signal(signal.SIGTERM)
    assert archiver.wait(90) == 0, archiver.tail()
    assert_archive_exact(private_settings, private_s3)


#: the archiver's commit bound in the freeze test, well inside the freeze
COMMIT_TIMEOUT_SECONDS = 3
FREEZE_SECONDS = 12.0
#: freezes at most, until one holds a commit
FREEZE_ROUNDS = 3
#: records/s produced while the freezes run, for FEED_SECONDS at most: the archiver always holds some
FEED_RATE, FEED_SECONDS = 2000, 45
#: time-driven flushes (2 s), so records consumed before a freeze are flushed, and committed, during it
FREEZE_ARCHIVER_ARGS = ("archiver", "--flush-records", "1000000", "--flush-seconds", "2", "--batch-size", "500",
                        "--log-interval", "0.5", "--session-timeout", "6",
                        "--commit-timeout", str(COMMIT_TIMEOUT_SECONDS))
#: a frozen broker: librdkafka's request timeouts, or the archiver giving up on its commit
FROZEN_LINES = re.compile(r"REQTMOUT|Timed out .* in flight|did not answer in time")
STUCK_REJOIN = re.compile(r"did not answer in time \(an offset commit did not return.*rejoining")
BUFFERED = re.compile(r"buffered=(\d+)")


def holds_records(worker: Worker, mark: int) -> bool:
    """The worker's newest counter line after ``mark`` shows records buffered or in flight to S3."""
    counts = BUFFERED.findall(worker.output()[mark:])
    return bool(counts) and int(counts[-1]) > 0


def test_archiver_rejoins_when_its_commit_hangs(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """A frozen broker (SIGSTOP: its connections stay open, nothing is answered) holds the archiver's
    offset commit, as a coordinator connection librdkafka never restores after a restart does. Past
    ``--commit-timeout`` the archiver drops its buffers and rejoins with a new consumer; after the
    thaw it archives everything exactly once (CI once saw a synchronous commit hang for good).

    A freeze holds a commit only if the archiver flushes during it, and fetching stops with the
    broker: so records keep arriving, flushes are time-driven (2 s), and each freeze starts when the
    archiver's latest counter line shows records held. A freeze that held no commit (the session
    simply expired) is followed by another, ``FREEZE_ROUNDS`` at most."""
    landed = threading.Event()

    def feed() -> None:
        """A second of records at a time, until the fault landed (records keep arriving until then)."""
        for second in range(FEED_SECONDS):
            if landed.is_set():
                return
            produce_orders(private_settings, FEED_RATE, 4_000 + second, days=2, rate=FEED_RATE)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        archiver = workers.start("archiver", *FREEZE_ARCHIVER_ARGS)
        for _ in range(FREEZE_ROUNDS):
            mark = len(archiver.output())
            wait_until(lambda m=mark: holds_records(archiver, m), 120, "the archiver to hold records not yet "
                       "flushed", detail=lambda: archiver.tail())
            freeze(private_stack, "kafka", FREEZE_SECONDS, "broker_freeze.archiver", archiver, FROZEN_LINES)
            if STUCK_REJOIN.search(archiver.output()):
                break
    finally:
        landed.set()
        feeder.join()
    wait_archived(private_settings, private_s3, timeout=240, worker=archiver)
    stuck = STUCK_REJOIN.findall(archiver.output())
    assert stuck, f"no commit hung in {FREEZE_ROUNDS} freezes (the fault did not land):\n{archiver.tail(60)}"
    FIGURES.count("archiver_stuck_commit_rejoins", len(stuck))
    archiver.signal(signal.SIGTERM)
    assert archiver.wait(90) == 0, archiver.tail()
    assert_archive_exact(private_settings, private_s3)


@pytest.mark.soak  # the archiver's freeze test covers the same bound in the default run
def test_live_processor_rejoins_when_its_commit_hangs(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """The single-stage processor's offset commit held by a frozen broker past ``--commit-timeout``: it
    rejoins with a new consumer, commits those offsets again, and its results equal the reference.
    The commit bound is inside the session, which would otherwise end the commit first.

    No malformed records: a checkpoint flushes its dead-letter records before it commits, and that
    flush waits for the frozen broker too, so the commit would only be reached once it is back."""
    produce_orders(private_settings, 20_000, 7, start=f"{DAY}T00:00:00Z",
                   faults=dataclasses.replace(FAULTY, malformed=0.0))
    archive_all(workers)
    live = workers.start("live-v1", *live_args(SINGLE_STAGE, "--commit-timeout", str(COMMIT_TIMEOUT_SECONDS),
                                               base=LIVE_KILL_ARGS))
    prefix, topic = keys.live_prefix("orders", SINGLE_STAGE), private_settings.events_topic
    progress = processor_progress(private_settings, private_s3, prefix, topic)
    started_some(progress, "the live processor to commit its first records")
    freeze(private_stack, "kafka", FREEZE_SECONDS, "broker_freeze.processor.live", live, FROZEN_LINES, progress)
    wait_processor_caught_up(private_settings, private_s3, prefix, topic, timeout=240, worker=live)
    ends = end_offsets(private_settings, topic)
    group = keys.live_group("orders", SINGLE_STAGE, prefix=private_settings.group_prefix)
    wait_until(lambda: group_committed(private_settings, group, topic, sorted(ends)) == ends, 60,
               f"group {group}'s Kafka commits to reach {ends}")
    live.signal(signal.SIGTERM)
    assert live.wait(90) == 0, f"the live processor did not stop cleanly:\n{live.tail()}"
    stuck = re.findall(r"did not answer in time \(offset commit: .*rejoining", live.output())
    assert stuck, f"no commit hung while the broker was frozen (the fault did not land):\n{live.tail(60)}"
    assert_live_exact(private_settings, private_s3, SINGLE_STAGE)


@pytest.mark.soak  # minutes; the archiver and the live processors (both stages) cover a broker restart by default
def test_replay_survives_broker_restarts(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """Broker restarted while the loader produces, then while the bounded processor consumes: both finish."""
    produce_orders(private_settings, 20_000, 3, start=f"{DAY}T00:00:00Z")
    archive_all(workers)
    spec = replay_spec(private_settings)
    day_records = len(archive_records(private_s3, spec.bucket, spec.source_topic, spec.day))
    loader = workers.start("load", *load_args(spec), "--throttle", "3000")
    produced = topic_progress(private_settings, spec.topic, day_records)
    started_some(produced, "the loader to produce its first records")
    outage(private_stack, "kafka", DOWN_SECONDS, "broker_restart.replay_loader", loader, KAFKA_DOWN_LINES, produced)
    assert loader.wait(240) == 0, f"the loader did not finish after the broker came back:\n{loader.tail()}"
    bounded = workers.start("bounded", *bounded_args(spec, batch_size=100))
    prefix = keys.processor_prefix(spec.pipeline, spec.version, spec.group)
    consumed = processor_progress(private_settings, private_s3, prefix, spec.topic)
    started_some(consumed, "the bounded processor to commit its first records")
    outage(private_stack, "kafka", DOWN_SECONDS, "broker_restart.processor.bounded", bounded, KAFKA_DOWN_LINES,
           consumed)
    assert bounded.wait(240) == 0, f"the bounded processor did not finish:\n{bounded.tail()}"
    assert_archive_exact(private_settings, private_s3)
    assert_replay_topic_exact(private_settings, private_s3, private_settings.events_topic, spec.topic, spec.day)
    assert_reports_exact(private_settings, private_s3, 2, [spec.day])
    assert_dlq_exact(private_settings, private_s3, spec.dlq_topic, spec.day)


#: longer than the dead-letter flush the processor used to wait before it gave up and exited (60 s)
LONG_DOWN_SECONDS = 75.0


@pytest.mark.soak  # over a minute of outage
def test_live_processor_survives_a_long_broker_outage_with_dead_letters_pending(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """Kafka down for longer than a checkpoint waits for its dead-letter records: the checkpoint is
    deferred, not fatal (RELIABILITY F11: the processor exited 2 after 60 s); it resumes on its own
    and its results equal the reference. The fault lands: a checkpoint was deferred."""
    produce_orders(private_settings, 15_000, 13, start=f"{DAY}T00:00:00Z")  # 5 % malformed: dead letters
    archive_all(workers)
    live = workers.start("live-v1", *live_args(SINGLE_STAGE, base=LIVE_KILL_ARGS))
    prefix, topic = keys.live_prefix("orders", SINGLE_STAGE), private_settings.events_topic
    progress = processor_progress(private_settings, private_s3, prefix, topic)
    started_some(progress, "the live processor to commit its first records")
    outage(private_stack, "kafka", LONG_DOWN_SECONDS, "broker_long_outage.processor.live", live, KAFKA_DOWN_LINES,
           progress)
    wait_processor_caught_up(private_settings, private_s3, prefix, topic, timeout=240, worker=live)
    live.signal(signal.SIGTERM)
    assert live.wait(90) == 0, f"the live processor did not stop cleanly:\n{live.tail()}"
    deferred = live.output().count("checkpoint deferred")
    print(f"[reliability] long outage: {deferred} checkpoints deferred")
    assert deferred, f"no checkpoint met the outage with dead letters pending: it did not land\n{live.tail()}"
    assert_live_exact(private_settings, private_s3, SINGLE_STAGE)
    assert_dlq_exact(private_settings, private_s3, private_settings.dlq_topic)


# single-stage under make soak: stage 2 of the shuffled run is the same consumer (rejoin, lost session)
@pytest.mark.parametrize("version", [pytest.param(SINGLE_STAGE, id="single-stage", marks=pytest.mark.soak),
                                     pytest.param(SHUFFLED, id="shuffled")])
def test_live_static_members_survive_broker_restart(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers, version: int
) -> None:
    """A live processor with static members across a broker restart keeps running: the broker stays down
    longer than the session, so its members lose their partitions and, often, a member's static re-join
    fences its own old member id (librdkafka#3437) and it rejoins with a new consumer (both counted);
    its results equal the reference."""
    produce_orders(private_settings, 10_000, 5, start=f"{DAY}T00:00:00Z")  # small batches: still mid-stream
    archive_all(workers)
    live = workers.start(f"live-v{version}", *live_args(version, *STATIC, base=LIVE_KILL_ARGS))
    prefix, topic = keys.live_prefix("orders", version), private_settings.events_topic
    progress = processor_progress(private_settings, private_s3, prefix, topic)
    started_some(progress, "the live processor to commit its first records")
    outage(private_stack, "kafka", STATIC_DOWN_SECONDS, f"broker_restart.processor.static_live_v{version}", live,
           KAFKA_DOWN_LINES, progress)
    wait_processor_caught_up(private_settings, private_s3, prefix, topic, timeout=240, worker=live)
    live.signal(signal.SIGTERM)
    assert live.wait(90) == 0, f"the live processor did not stop cleanly:\n{live.tail()}"
    fenced, recovered = rejoins(live)
    print(f"[reliability] live v{version}: {fenced} self-fence rejoins, {recovered} recoveries")
    assert recovered >= 1, f"the restart cost the processor nothing to recover from: it did not land\n{live.tail()}"
    assert_live_exact(private_settings, private_s3, version)


@pytest.mark.soak  # archive + load + replay: minutes; the live variant above covers the same rejoin paths
def test_shuffled_replay_static_members_survive_broker_restart(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers
) -> None:
    """A bounded orders v2 replay (shuffled) (static members) with the broker restarted mid-stream finishes on
    its own; its report and DLQ equal the reference."""
    produce_orders(private_settings, 20_000, 6, start=f"{DAY}T00:00:00Z")
    archive_all(workers)
    spec = replay_spec(private_settings, version=SHUFFLED)
    workers.run("load", *load_args(spec))
    bounded = workers.start("bounded-v2", *bounded_args(spec, 20, *STATIC))
    prefix = keys.processor_prefix(spec.pipeline, spec.version, spec.group)
    consumed = processor_progress(private_settings, private_s3, prefix, spec.topic)
    started_some(consumed, "the shuffled bounded processor to commit its first records")
    outage(private_stack, "kafka", STATIC_DOWN_SECONDS, "broker_restart.processor.shuffled_bounded", bounded,
           KAFKA_DOWN_LINES, consumed)
    assert bounded.wait(240) == 0, f"the shuffled bounded processor did not finish:\n{bounded.tail()}"
    fenced, recovered = rejoins(bounded)
    print(f"[reliability] shuffled bounded: {fenced} self-fence rejoins, {recovered} recoveries")
    assert recovered >= 1, f"the restart cost the processor nothing to recover from: it did not land\n{bounded.tail()}"
    assert_reports_exact(private_settings, private_s3, SHUFFLED, [spec.day])
    assert_dlq_exact(private_settings, private_s3, spec.dlq_topic, spec.day)


def test_fresh_kraft_cluster_id_is_never_read_as_an_option() -> None:
    """Regression: ids starting with '-' made `kafka-storage format -t <id>` fail on 1 fresh start in 64."""
    from workers.dev.stack import cluster_id

    ids = [cluster_id() for _ in range(5000)]
    assert not [cid for cid in ids if cid.startswith("-")]
    assert len(set(ids)) == len(ids)


def test_end_offsets_answer_right_after_a_broker_restart(private_stack: Stack, private_settings: Settings,
                                                         seed: int) -> None:
    """Every "caught up?" check asks ``kafka.end_offsets``, through the process's cached AdminClient.
    Just after a broker start the broker may refuse its first answers (UNKNOWN_LEADER_EPOCH: the
    client sends the epoch it knew, the broker has not loaded it yet); those are retried, and the
    answer equals the offsets before the restart. Whether the broker refuses first varies from run to
    run: the retries are counted and printed, the answer is what is asserted."""
    from confluent_kafka import KafkaException

    from workers import kafka as kafka_helpers

    topic = private_settings.events_topic
    produce_orders(private_settings, 300, seed)
    before = kafka_helpers.end_offsets(private_settings, topic)  # the cached client learns the epochs
    assert sum(before.values()) == 300
    assert private_stack.down(["kafka"]) == ["kafka"]
    private_stack.up(["kafka"])
    admin, refused = kafka_helpers.admin_client(private_settings), []
    original = admin.list_offsets

    def counting(*args: Any, **kwargs: Any) -> Any:
        futures = original(*args, **kwargs)
        for future in futures.values():
            try:
                future.result()
            except KafkaException as exc:
                refused.append(exc.args[0].name())
                break
        return futures

    admin.list_offsets = counting  # type: ignore[method-assign]
    try:
        after = kafka_helpers.end_offsets(private_settings, topic, timeout=60)
    finally:
        del admin.list_offsets
    print(f"[reliability] end offsets after the restart: {len(refused)} refused answers first {refused}")
    assert after == before
