"""The processor against the real broker and S3: DLQ, v1/v2, bounded reports, order independence,
crash safety (SIGKILL), rebalance, live results and late records, CLI errors."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import polars as pl
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from test_pipelines import BASE_MS, MALFORMED, assert_reports_match, event, plain_report

from tests.committed import committed_offsets
from workers import kafka as kafka_helpers
from workers import keys
from workers.archive import format as archive_format
from workers.config import Settings
from workers.pipelines import get_pipeline
from workers.processor.engine import RunSummary, run_processor
from workers.processor.results import corrected_report, live_results
from workers.processor.state import list_states

DAY = "2026-01-01"
Record = tuple[bytes | None, bytes | None, int, list[tuple[str, bytes]]]  # key, value, timestamp, headers


def make_records(n: int, seed: int, duplicates: float = 0.1, malformed: float = 0.05) -> list[Record]:
    """Keyed events over ~5 hours of one day; re-sends are exact copies (same key, so same partition)."""
    rng = random.Random(seed)
    records: list[Record] = []
    for i in range(n):
        key = f"u{rng.randrange(20)}".encode()
        ts = BASE_MS + i * 1_013
        headers = [("source", b"web")] if rng.random() < 0.3 else []
        records.append((key, event(i, rng), ts, headers))
        if rng.random() < duplicates:
            records.append(records[-1])
        if rng.random() < malformed:
            sort = rng.choice(sorted(MALFORMED))
            records.append((None if sort == "tombstone" else key, MALFORMED[sort], ts, [("sort", sort.encode())]))
    return records


def produce(settings: Settings, topic: str, records: list[Record]) -> None:
    producer = Producer(settings.kafka_config(**{"linger.ms": 20, "enable.idempotence": True}))
    for index, (key, value, ts, headers) in enumerate(records):
        producer.produce(topic, value=value, key=key, timestamp=ts, headers=headers or None)
        if index % 50_000 == 49_999:
            producer.flush(30)
    assert producer.flush(30) == 0


def consume_all(settings: Settings, topic: str) -> list[Any]:
    """Every record of ``topic`` (by assignment, no group offsets), in partition/offset order.

    Done when every partition reports its end at or past the end offset read first: counting records
    would never get there on a transactional topic (e.g. stage 1's DLQ), whose commit markers take
    offsets but are never delivered."""
    ends = {p: end for p, end in kafka_helpers.end_offsets(settings, topic).items() if end > 0}
    consumer = Consumer(settings.kafka_config(**{"group.id": "test-reader", "enable.auto.commit": False,
                                                 "enable.partition.eof": True}))
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    messages: list[Any] = []
    pending, deadline = set(ends), time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for message in consumer.consume(1000, timeout=1):
            if message.error() is None:
                messages.append(message)
            elif message.error().code() == KafkaError._PARTITION_EOF and message.offset() >= ends[message.partition()]:
                pending.discard(message.partition())
    consumer.close()
    assert not pending, f"{topic}: partitions {sorted(pending)} did not reach their end offsets within 60 s"
    return sorted(messages, key=lambda m: (m.partition(), m.offset()))


def archive_of(settings: Settings, topic: str) -> pl.DataFrame:
    """The topic as raw archive rows (what the archiver would write), for the batch reference."""
    return archive_format.frame_from_messages(consume_all(settings, topic))


def read_report(s3: Any, settings: Settings, version: int) -> tuple[pl.DataFrame, dict[str, int]]:
    report = corrected_report(s3, settings.s3_bucket, "orders", version, DAY)
    assert report is not None
    return report.frame, report.stats


def bounded(
    settings: Settings, version: int, topic: str, group: str, grace_ms: int | None = None, **options: Any
) -> RunSummary:
    summary = run_processor(
        settings, "orders", version, topic=topic, group=group, bounded=True, start="earliest", grace_ms=grace_ms,
        **options,
    )
    assert summary.complete
    return summary


@pytest.fixture
def events_topic(settings: Settings, topic_factory: Callable[..., str]) -> Callable[[list[Record], int], str]:
    def create(records: list[Record], partitions: int = 3) -> str:
        topic = topic_factory("events", partitions)
        produce(settings, topic, records)
        return topic

    return create


def processor_command(version: int, topic: str, group: str, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "workers.cli", "processor", "--pipeline", "orders", "--version", str(version)),
        *("--topic", topic, "--group", group, "--from-beginning", "--until-end", "--progress", "log"),
        *extra,
    ]


# -------------------------------------------------------------------- DLQ


def test_every_malformed_record_reaches_the_dlq_with_a_reason(settings: Settings, s3: Any, events_topic) -> None:
    records = make_records(300, seed=1, malformed=0.15)
    topic = events_topic(records)
    summary = bounded(settings, 1, topic, "g-dlq", batch_size=64)

    raw = archive_of(settings, topic)
    bad = raw.filter(pl.col("value").is_in(list(MALFORMED.values())) | pl.col("value").is_null())
    assert bad.height >= 20 and summary.dlq_records == bad.height
    dlq = consume_all(settings, settings.dlq_topic)
    assert len(dlq) == bad.height
    by_source = {}
    for message in dlq:
        headers = dict(message.headers())
        assert headers["kappa.dlq.reason"] and headers["kappa.dlq.topic"] == topic.encode()
        by_source[(int(headers["kappa.dlq.partition"]), int(headers["kappa.dlq.offset"]))] = message
    for row in bad.iter_rows(named=True):
        message = by_source[(row["partition"], row["offset"])]
        assert (message.key(), message.value(), message.timestamp()[1]) == (
            row["key"],
            row["value"],
            int(row["timestamp"].timestamp() * 1000),
        )
        assert [h for h in message.headers() if not h[0].startswith("kappa.dlq.")] == [
            (h["key"], h["value"]) for h in row["headers"]
        ]
    report, stats = read_report(s3, settings, 1)
    assert stats["dlq"] == bad.height and report["events"].sum() == raw.height - bad.height == stats["counted"]
    cli = subprocess.run(  # `kappa report` prints the corrected report by default
        [sys.executable, "-m", "workers.cli", "report", "-p", "orders", "-v", "1", "-d", DAY, "--format", "csv"],
        capture_output=True,
        check=True,
    )
    printed = pl.read_csv(io.BytesIO(cli.stdout))
    assert printed.height == report.height and printed["events"].to_list() == report["events"].to_list()


# -------------------------------------------------------------------- v1 vs v2, bounded = batch


def test_v1_counts_duplicates_v2_does_not_both_equal_batch_report(settings: Settings, s3: Any, events_topic) -> None:
    records = make_records(1500, seed=2)
    topic = events_topic(records)
    raw = archive_of(settings, topic)
    valid = raw.filter(~(pl.col("value").is_in(list(MALFORMED.values())) | pl.col("value").is_null()))
    results = {}
    for version in (1, 2):
        bounded(settings, version, topic, f"g-v{version}", batch_size=500)
        report, stats = read_report(s3, settings, version)
        expected, expected_stats = get_pipeline("orders", version).batch_report(raw)
        assert report.equals(expected)
        assert stats == expected_stats
        plain = plain_report(
            valid["value"].to_list(),
            valid["timestamp"].dt.epoch("ms").to_list(),
            valid["partition"].to_list(),
            dedup=version == 2,
        )
        assert_reports_match(report, plain)
        results[version] = (report, stats)
    duplicates = results[2][1]["duplicates"]
    assert duplicates > 50
    assert results[1][0]["events"].sum() == results[2][0]["events"].sum() + duplicates
    assert results[1][1]["duplicates"] == 0


def test_results_do_not_depend_on_batch_size_or_partition_count(
    settings: Settings, s3: Any, events_topic: Callable[..., str]
) -> None:
    records = make_records(1200, seed=3)
    reports = []
    for partitions, batch_size in ((1, 1000), (4, 13), (3, 257)):
        topic = events_topic(records, partitions)
        bounded(settings, 2, topic, f"g-order-{partitions}", batch_size=batch_size, checkpoint_seconds=0.2)
        reports.append(read_report(s3, settings, 2))
    assert all(r[0].equals(reports[0][0]) and r[1] == reports[0][1] for r in reports[1:])


def test_event_time_ordered_topic_with_grace_0_gives_the_batch_report(
    settings: Settings, s3: Any, events_topic
) -> None:
    """A replay topic is in event-time order per partition, so replay_consume passes grace 0
    (bounded state): nothing is late and the report still equals the batch reference."""
    records = make_records(1500, seed=5)  # timestamps never decrease, like a replay topic's
    topic = events_topic(records)
    raw = archive_of(settings, topic)
    summary = bounded(settings, 2, topic, "g-grace0", grace_ms=0, batch_size=200, checkpoint_seconds=0.2)
    assert summary.late_records == 0
    report, stats = read_report(s3, settings, 2)
    expected, expected_stats = get_pipeline("orders", 2).batch_report(raw)
    assert report.equals(expected)
    assert stats == expected_stats


# -------------------------------------------------------------------- crash safety and rebalance


# the default run's live-processor kill points are the reliability suite's
# (tests/reliability/test_process_faults.py, with figures); this variant runs with the soak
@pytest.mark.soak
def test_sigkill_at_random_moments_then_restart_gives_identical_results(
    settings: Settings, s3: Any, events_topic
) -> None:
    records = make_records(12_000, seed=4)
    topic = events_topic(records)
    command = processor_command(2, topic, "g-crash", "--batch-size", "50", "--checkpoint-seconds", "0.2")
    rng = random.Random(4)
    kills = 0
    for attempt in range(6):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            process.wait(timeout=rng.uniform(2.0, 5.0) if attempt < 4 else 120)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        assert process.returncode == 0, process.stderr.read().decode()[-2000:] if process.stderr else ""
        break
    assert kills >= 2, "the run finished before it could be killed: make the input larger"
    crashed = read_report(s3, settings, 2)

    bounded(settings, 2, topic, "g-clean", batch_size=1000)
    clean = read_report(s3, settings, 2)
    assert crashed[0].equals(clean[0]) and crashed[1] == clean[1]
    assert crashed[0].equals(get_pipeline("orders", 2).batch_report(archive_of(settings, topic))[0])
    # DLQ: at least once across crashes, exactly once after dedup on the source coordinates
    dlq = {(m.headers()[-3][1], m.headers()[-2][1]) for m in consume_all(settings, settings.dlq_topic)}
    assert len(dlq) == crashed[1]["dlq"]


@pytest.mark.soak  # reliability/test_rebalance_storm covers joins and leaves mid-run by default
def test_rebalance_two_processors_one_stopped_mid_run(settings: Settings, s3: Any, events_topic) -> None:
    """A starts alone, B joins (A hands over half its partitions), then A is stopped (B takes all)."""
    records = make_records(30_000, seed=5)
    topic = events_topic(records, 4)
    command = processor_command(2, topic, "g-rebalance", "--batch-size", "20", "--checkpoint-seconds", "0.3")
    prefix = keys.processor_prefix("orders", 2, "g-rebalance")

    def writers() -> set[str]:
        return {s["writer"] for s in list_states(s3, settings.s3_bucket, prefix).values()}

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: len(writers()) == 1)
    second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: len(writers()) == 2)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 130, "the first processor should stop before the end"
    assert second.wait(timeout=120) == 0, second.stderr.read().decode()[-2000:] if second.stderr else ""
    report, stats = read_report(s3, settings, 2)
    expected, expected_stats = get_pipeline("orders", 2).batch_report(archive_of(settings, topic))
    assert report.equals(expected) and stats == expected_stats


# -------------------------------------------------------------------- live mode


def run_live(settings: Settings, version: int, stop: threading.Event, result: list, **options: Any) -> threading.Thread:
    def target() -> None:
        result.append(
            run_processor(settings, "orders", version, start="earliest", checkpoint_seconds=0.3, stop=stop, **options)
        )

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_live_results_survive_a_restart_and_late_records_are_counted(settings: Settings, s3: Any) -> None:
    kafka_helpers.ensure_topic(settings, settings.events_topic, 3)
    records = make_records(2000, seed=6, malformed=0.0)
    produce(settings, settings.events_topic, records[:1000])

    def live_events(include_open: bool = True) -> int:
        frame = live_results(s3, settings.s3_bucket, "orders", 2, DAY, include_open=include_open)
        return int(frame["events"].sum() or 0)

    stop, result = threading.Event(), []
    thread = run_live(settings, 2, stop, result, grace_ms=120_000)
    wait_for(lambda: live_events() > 0)
    stop.set()
    thread.join(60)
    produce(settings, settings.events_topic, records[1000:])
    stop, result = threading.Event(), []
    thread = run_live(settings, 2, stop, result, grace_ms=120_000)

    expected, _ = get_pipeline("orders", 2).batch_report(archive_of(settings, settings.events_topic))
    wait_for(lambda: live_events() == expected["events"].sum())
    late_value = json.dumps({"event_id": "late-1", "user_id": "u1", "type": "refund", "amount": 7}).encode()
    produce(settings, settings.events_topic, [(b"u1", late_value, BASE_MS, [])])
    wait_for(lambda: sum(s["stats"][DAY]["late"] for s in live_states(s3, settings).values()) == 1)
    stop.set()
    thread.join(60)

    assert live_results(s3, settings.s3_bucket, "orders", 2, DAY, include_open=True).equals(expected)
    closed = live_results(s3, settings.s3_bucket, "orders", 2, DAY)
    assert 0 < closed.height < expected.height and expected.head(closed.height).equals(closed)
    assert result[0].late_records == 1

    report = [sys.executable, "-m", "workers.cli", "report", "-p", "orders", "-v", "2", "-d", DAY, "--format", "csv"]
    cli = subprocess.run([*report, "--live"], capture_output=True, check=True)
    assert pl.read_csv(io.BytesIO(cli.stdout)).height == closed.height
    # the default is the corrected report, which no replay has written here: one line naming the job
    missing = subprocess.run(report, capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert missing.returncode == 2 and not missing.stdout
    assert missing.stderr.count("\n") == 1 and "no corrected report of orders v2" in missing.stderr
    assert "-j reprocess" in missing.stderr and "--live" in missing.stderr, missing.stderr


def live_states(s3: Any, settings: Settings, version: int = 2) -> dict[int, dict]:
    return list_states(s3, settings.s3_bucket, keys.live_prefix("orders", version))


def input_position(settings: Settings, version: int, partition: int, s3: Any) -> int | None:
    """Where the live processor is in the events topic: its state (single stage) or the stage-1
    group's committed offset (the shuffle: stage-2 states are per repartition partition)."""
    if not get_pipeline("orders", version).state_key:
        return live_states(s3, settings, version).get(partition, {}).get("next_offset")
    group = keys.live_group("orders", version, prefix=settings.group_prefix)
    committed = committed_offsets(settings, group, settings.events_topic, [partition])[partition]
    return committed if committed >= 0 else None


# -------------------------------------------------------------------- user mistakes


@pytest.mark.parametrize(("pipeline", "version"), [("nope", "1"), ("orders", "99")])
def test_unknown_pipeline_or_version_is_one_line_and_non_zero(settings: Settings, pipeline: str, version: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "workers.cli", "processor", "--pipeline", pipeline, "--version", version],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "orders v1, orders v2" in lines[0], run.stderr


# -------------------------------------------------------------------- worker bugs (issue 16)


def orders_value(event_id: str, amount: int = 1) -> bytes:
    return json.dumps({"event_id": event_id, "user_id": "u1", "type": "purchase", "amount": amount}).encode()


def test_a_malformed_record_stamped_ahead_does_not_move_the_watermark(settings: Settings, s3, events_topic) -> None:
    """A bad record 50 minutes ahead (the broker accepts up to 1 h) must not make the next 49 minutes late."""
    minute = 60_000
    records: list[Record] = [(b"k", orders_value(f"a{i}"), BASE_MS + i * minute, []) for i in range(5)]
    records.append((b"k", b"{not json", BASE_MS + 55 * minute, []))
    records += [(b"k", orders_value(f"b{i}"), BASE_MS + (5 + i) * minute, []) for i in range(30)]
    topic = events_topic(records, 1)
    summary = bounded(settings, 2, topic, "g-watermark", grace_ms=minute, batch_size=7)
    assert (summary.dlq_records, summary.late_records) == (1, 0)
    report, stats = read_report(s3, settings, 2)
    assert stats["counted"] == 35 and report["events"].sum() == 35


@pytest.mark.parametrize("version", [1, 2])  # single stage, and stage 1 of the shuffle
def test_a_partition_added_while_live_is_read_from_its_first_record(settings: Settings, s3: Any, version: int) -> None:
    """--start latest is for the group's first start; a partition added later is new from offset 0."""
    from confluent_kafka.admin import AdminClient, NewPartitions

    kafka_helpers.ensure_topic(settings, settings.events_topic, 1)
    before = [(b"k", orders_value(f"old{i}"), BASE_MS, []) for i in range(5)]
    produce(settings, settings.events_topic, before)  # history before the group's first start: skipped
    fast_metadata = dataclasses.replace(
        settings, kafka_extra={**settings.kafka_extra, "topic.metadata.refresh.interval.ms": "5000"}
    )
    stop, result = threading.Event(), []

    def counted() -> int:
        return sum(s["stats"].get(DAY, {}).get("counted", 0) for s in live_states(s3, settings, version).values())

    def target() -> None:
        result.append(run_processor(fast_metadata, "orders", version, start="latest", checkpoint_seconds=0.3,
                                    stop=stop))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        wait_for(lambda: input_position(settings, version, 0, s3) is not None)  # partition 0 at its end
        produce(settings, settings.events_topic, [(b"k", orders_value(f"p0-{i}"), BASE_MS, []) for i in range(10)])
        wait_for(lambda: counted() == 10)
        admin = AdminClient(settings.kafka_config())
        admin.create_partitions([NewPartitions(settings.events_topic, 2)])[settings.events_topic].result(30)
        producer = Producer(settings.kafka_config())
        for i in range(20):  # written before the processor is assigned the new partition
            producer.produce(settings.events_topic, value=orders_value(f"p1-{i}"), partition=1, timestamp=BASE_MS)
        assert producer.flush(30) == 0
        early = input_position(settings, version, 1, s3)
        assert early is None, "the processor was assigned the new partition too early"
        wait_for(lambda: counted() == 30)
    finally:
        stop.set()
        thread.join(60)
    assert input_position(settings, version, 1, s3) == 20


def test_a_crash_never_checkpoints_half_applied_state(
    settings: Settings, s3: Any, events_topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DLQ send fails after a batch was applied: close() must not commit that batch (its DLQ
    records were never sent), so a restart redoes it and every malformed record reaches the DLQ."""
    from workers.processor import engine as processor_module

    records = make_records(600, seed=9, malformed=0.2)
    topic = events_topic(records, 1)
    real_send, calls = processor_module.Processor.send_to_dlq, []

    def failing_send(self: Any, rejects: pl.DataFrame, messages: list) -> None:
        calls.append(rejects.height)
        if len(calls) == 3:
            raise RuntimeError("injected DLQ failure after the batch was applied")
        real_send(self, rejects, messages)

    monkeypatch.setattr(processor_module.Processor, "send_to_dlq", failing_send)
    with pytest.raises(RuntimeError, match="injected"):
        run_processor(settings, "orders", 2, topic=topic, group="g-halfway", bounded=True, start="earliest",
                      batch_size=50, checkpoint_seconds=0.05)
    assert len(calls) == 3
    monkeypatch.setattr(processor_module.Processor, "send_to_dlq", real_send)
    bounded(settings, 2, topic, "g-halfway", batch_size=50)
    raw = archive_of(settings, topic)
    bad = raw.filter(pl.col("value").is_in(list(MALFORMED.values())) | pl.col("value").is_null())
    dlq = {(int(dict(m.headers())["kappa.dlq.partition"]), int(dict(m.headers())["kappa.dlq.offset"]))
           for m in consume_all(settings, settings.dlq_topic)}
    assert dlq == set(zip(bad["partition"].to_list(), bad["offset"].to_list(), strict=True))
    _report, stats = read_report(s3, settings, 2)
    assert stats == get_pipeline("orders", 2).batch_report(raw)[1]


def test_timestamps_past_year_9999_go_to_the_dlq_with_a_reason(settings: Settings, s3: Any, unique) -> None:
    """Older brokers (or a lenient topic) accept them; they have no day to be reported under."""
    topic = unique("events")
    kafka_helpers.ensure_topic(settings, topic, 1, {"message.timestamp.after.max.ms": str(2**63 - 1)})
    records: list[Record] = [(b"k", orders_value(f"e{i}"), BASE_MS + i, []) for i in range(5)]
    records += [(b"k", orders_value("far"), 253_402_300_800_000, []), (b"k", orders_value("max"), 2**63 - 1, [])]
    produce(settings, topic, records)
    summary = bounded(settings, 2, topic, "g-far", grace_ms=60_000)
    assert (summary.records, summary.dlq_records) == (7, 2)
    reasons = [dict(m.headers())["kappa.dlq.reason"] for m in consume_all(settings, settings.dlq_topic)]
    assert reasons == [b"timestamp after 9999-12-31 (no calendar day)"] * 2
    report, stats = read_report(s3, settings, 2)
    assert stats["counted"] == 5 and report["events"].sum() == 5
