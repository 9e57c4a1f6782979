"""Keyed state across partitions (issue 12): orders v2 counts an event_id once per window whatever
partition or key carried its copies, in bounded replay and live, and under SIGKILLs of either stage.

The oracle is written here with json + polars only (no pipeline, engine or generator code): it
validates values by the orders rules, then keeps per (1-minute window, event_id) the copy with the
smallest (timestamp, partition, offset).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from test_processor import consume_all

from tests.committed import committed_offsets
from workers import kafka as kafka_helpers
from workers import keys
from workers.config import Settings
from workers.dev.generator import LATE_MAX_MS, Faults, produce_events
from workers.processor.engine import run_processor
from workers.processor.results import corrected_report, live_results
from workers.processor.state import list_states
from workers.s3 import Fenced, ensure_bucket, get_bytes, s3_client

START = "2026-01-01T21:00:00+00:00"  # 6 hours of events: two UTC days
SEED = 21
FAULTS = Faults(duplicates=0.15, late=0.03, malformed=0.03)
LIVE_GRACE_MS = 7 * 3_600_000  # longer than the generator makes an event late (LATE_MAX_MS, 6 h)
TYPES = {"page_view", "add_to_cart", "purchase", "refund"}
#: (name, keying, partitions, share of duplicates re-sent through another path)
WAYS = [
    ("user6", "user", 6, 0.0),
    ("keyless3", "none", 3, 0.0),
    ("eventid12", "event-id", 12, 0.0),
    ("rerouted6", "user", 6, 0.3),
]


# -------------------------------------------------------------------- the independent oracle


def order_of(value: bytes | None) -> dict | None:
    """The orders validation rules, restated: None when the value is malformed."""
    try:
        body = json.loads(value.decode("utf-8"))  # type: ignore[union-attr]
    except (AttributeError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    fields = [body.get(k) for k in ("event_id", "user_id", "type", "amount")]
    event_id, user_id, kind, amount = fields
    if not (isinstance(event_id, str) and isinstance(user_id, str) and kind in TYPES):
        return None
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
        return None
    return body if abs(amount) < 1e15 else None


def read_topic(settings: Settings, topic: str) -> list[Any]:
    messages = consume_all(settings, topic)
    assert len(messages) == sum(kafka_helpers.end_offsets(settings, topic).values())
    return messages


def valid_rows(messages: list[Any]) -> pl.DataFrame:
    rows = []
    for m in messages:
        body = order_of(m.value())
        if body is not None:
            ts = m.timestamp()[1]
            rows.append({"ts": ts, "partition": m.partition(), "offset": m.offset(), "window": ts // 60_000 * 60_000,
                         "event_id": body["event_id"], "type": body["type"], "amount": float(body["amount"])})
    return pl.DataFrame(rows)


def oracle(messages: list[Any], per_partition: bool = False) -> dict[str, pl.DataFrame]:
    """Per UTC day: events and amount per (window, type) after dedup by event_id across partitions."""
    rows = valid_rows(messages).sort("ts", "partition", "offset")
    subset = ["window", "event_id", *(["partition"] if per_partition else [])]
    kept = rows.unique(subset=subset, keep="first", maintain_order=True)
    report = (
        kept.group_by("window", "type")
        .agg(pl.len().cast(pl.Int64).alias("events"), pl.col("amount").sum())
        .with_columns(pl.col("window").cast(pl.Datetime("ms", "UTC")).alias("window_start"))
        .select("window_start", "type", "events", "amount")
        .sort("window_start", "type")
    )
    days = report.with_columns(pl.col("window_start").dt.date().cast(pl.String).alias("day"))
    return {day: frame.drop("day") for (day,), frame in days.partition_by("day", as_dict=True).items()}


def assert_matches_oracle(actual: dict[str, pl.DataFrame], expected: dict[str, pl.DataFrame]) -> None:
    assert sorted(actual) == sorted(expected)
    for day, frame in expected.items():
        got = actual[day]
        assert got.select("window_start", "type", "events").equals(frame.select("window_start", "type", "events")), day
        assert (got["amount"] - frame["amount"]).abs().max() < 1e-6  # the oracle adds floats


def assert_late_only_stale_copies(settings: Settings, topic: str, messages: list[Any], late_records: int) -> None:
    """What a live run may send to the late topic: only re-sent copies trailing their stream by more
    than any event is late. The generator re-sends a copy of any of its last 5000 events, so a copy
    can trail by more than the grace; whether it meets its window open (a duplicate) or closed (late)
    depends on when stage 1 commits. Either way it is not counted, so the results do not change. An
    event itself is at most ``LATE_MAX_MS`` behind its partition: it must never be late."""
    rows = valid_rows(messages).sort("partition", "offset")
    copies = pl.len().over("window", "event_id") > 1
    trailing = pl.col("window") + 60_000 <= pl.col("ts").cum_max().shift(1).over("partition") - LATE_MAX_MS
    stale = set(rows.filter(copies & trailing).select("partition", "offset").iter_rows())
    late = []
    for message in consume_all(settings, settings.late_topic):
        headers = {k: v.decode() for k, v in message.headers() or [] if k.startswith("kappa.late.")}
        if headers["kappa.late.topic"] == topic:
            late.append((int(headers["kappa.late.partition"]), int(headers["kappa.late.offset"])))
    assert len(late) == late_records, f"{late_records} counted late, {len(late)} on {settings.late_topic}"
    assert set(late) <= stale, f"late but no stale copy: {sorted(set(late) - stale)}"


# -------------------------------------------------------------------- helpers


def bucket_settings(settings: Settings, name: str) -> Settings:
    """Reports and live results sit at fixed keys per pipeline version: one bucket per way."""
    own = dataclasses.replace(settings, s3_bucket=f"{settings.s3_bucket}-{name}"[:63])
    ensure_bucket(s3_client(own), own.s3_bucket)
    return own


def reports(settings: Settings, days: list[str]) -> dict[str, pl.DataFrame]:
    client, found = s3_client(settings), {}
    for day in days:
        report = corrected_report(client, settings.s3_bucket, "orders", 2, day)
        assert report is not None, f"no report for {day}"
        found[day] = report.frame
    return found


def live(settings: Settings, days: list[str]) -> dict[str, pl.DataFrame]:
    """Closed + open windows; a checkpoint racing the read (snapshot replaced) is read again."""
    for attempt in range(10):
        try:
            client = s3_client(settings)
            results = {day: live_results(client, settings.s3_bucket, "orders", 2, day, include_open=True)
                       for day in days}
            return {day: frame for day, frame in results.items() if frame.height}
        except Fenced:
            if attempt == 9:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def same(first: dict[str, pl.DataFrame], second: dict[str, pl.DataFrame]) -> bool:
    return sorted(first) == sorted(second) and all(first[d].equals(second[d]) for d in first)


def total(results: dict[str, pl.DataFrame]) -> int:
    return sum(int(frame["events"].sum()) for frame in results.values())


def wait_for(condition: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def run_live(settings: Settings, topic: str, group: str) -> tuple[threading.Event, threading.Thread, list]:
    stop, result = threading.Event(), []

    def target() -> None:
        result.append(run_processor(settings, "orders", 2, topic=topic, group=group, start="earliest",
                                    grace_ms=LIVE_GRACE_MS, checkpoint_seconds=0.3, batch_size=400, stop=stop))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return stop, thread, result


def ordered_copy(settings: Settings, topic: str, messages: list[Any], partitions: int) -> None:
    """What the replay loader writes: event-time order per partition, archive coordinates in headers."""
    kafka_helpers.ensure_topic(settings, topic, partitions)
    producer = Producer(settings.kafka_config(**{"linger.ms": 20, "enable.idempotence": True}))
    for m in sorted(messages, key=lambda m: (m.timestamp()[1], m.partition(), m.offset())):
        headers = [("kappa.src.partition", str(m.partition()).encode()), ("kappa.src.offset", str(m.offset()).encode())]
        producer.produce(topic, value=m.value(), key=m.key(), timestamp=m.timestamp()[1], headers=headers,
                         partition=random.Random(m.key()).randrange(partitions))
    assert producer.flush(30) == 0


# -------------------------------------------------------------------- the property


def test_four_ways_of_producing_give_the_same_v2_reports_and_live_results(settings: Settings) -> None:
    produced: dict[str, tuple[Settings, str, list[Any]]] = {}
    for name, keying, partitions, rerouted in WAYS:
        own = bucket_settings(settings, name)
        topic = f"{settings.events_topic}.{name}"
        faults = dataclasses.replace(FAULTS, rerouted=rerouted)
        produce_events(own, 1500, topic=topic, start=START, days=0.25, partitions=partitions, seed=SEED,
                       faults=faults, keying=keying)
        produced[name] = (own, topic, read_topic(own, topic))

    # the same events: identical values and timestamps, whatever the keys and partitions
    contents = {name: Counter((m.value(), m.timestamp()[1]) for m in msgs) for name, (_, _, msgs) in produced.items()}
    assert all(c == contents["user6"] for c in contents.values())
    expected = oracle(produced["user6"][2])
    days = sorted(expected)
    assert len(days) == 2
    # the data is worth testing: copies of one event_id arrive through several partitions, and
    # per-partition dedup would count them twice
    for name in ("keyless3", "rerouted6"):
        spread = valid_rows(produced[name][2]).group_by("event_id").agg(pl.col("partition").n_unique().alias("n"))
        assert spread.filter(pl.col("n") > 1).height > 10, name
        assert total(oracle(produced[name][2], per_partition=True)) > total(expected), name

    for name, (own, topic, messages) in produced.items():
        assert_matches_oracle(oracle(messages), expected)  # the oracle itself is order independent
        summary = run_processor(own, "orders", 2, topic=topic, group=f"g-{name}", bounded=True, start="earliest",
                                grace_ms=None, batch_size=300, checkpoint_seconds=0.3)
        assert summary.complete and summary.late_records == 0
        assert_matches_oracle(reports(own, days), expected)
        assert same(reports(own, days), reports(produced["user6"][0], days)), name

    for name, (own, topic, _) in produced.items():
        stop, thread, result = run_live(own, topic, f"g-live-{name}")
        try:
            wait_for(lambda own=own: total(live(own, days)) == total(expected))
        finally:
            stop.set()
            thread.join(60)
        assert result
        assert_late_only_stale_copies(own, topic, messages, result[0].late_records)
        assert_matches_oracle(live(own, days), expected)
        assert same(live(own, days), live(produced["user6"][0], days)), name


def test_event_time_ordered_replay_topic_with_grace_0_is_exact(settings: Settings) -> None:
    """Bounded over a replay-like topic: windows close as the stream moves on, nothing is late,
    and the copy rule uses the archive coordinates of the kappa.src.* headers."""
    source = f"{settings.events_topic}.src"
    produce_events(settings, 1500, topic=source, start=START, days=0.25, partitions=3, seed=SEED,
                   faults=dataclasses.replace(FAULTS, late=0.0), keying="none")
    messages = read_topic(settings, source)
    replay = f"{settings.events_topic}.replay"
    ordered_copy(settings, replay, messages, partitions=4)
    summary = run_processor(settings, "orders", 2, topic=replay, group="g-ordered", bounded=True, start="earliest",
                            grace_ms=0, batch_size=200, checkpoint_seconds=0.3)
    assert summary.complete and summary.late_records == 0
    expected = oracle(messages)
    assert_matches_oracle(reports(settings, sorted(expected)), expected)


def test_differing_copies_count_the_smallest_timestamp_partition_offset(settings: Settings) -> None:
    """Copies of one event_id that differ in payload: the rule picks the same one whatever arrives first."""
    topic = f"{settings.events_topic}.copies"
    kafka_helpers.ensure_topic(settings, topic, 3)
    base = 1_767_225_600_000 + 10_000
    producer = Producer(settings.kafka_config())
    copies = [(2, base + 5, "refund", 1), (0, base + 5, "purchase", 2), (1, base + 1, "add_to_cart", 3)]
    for partition, ts, kind, amount in copies:  # arrival order differs from the rule's order
        value = json.dumps({"event_id": "same", "user_id": "u", "type": kind, "amount": amount}).encode()
        producer.produce(topic, value=value, timestamp=ts, partition=partition)
    later = json.dumps({"event_id": "other", "user_id": "u", "type": "purchase", "amount": 9}).encode()
    producer.produce(topic, value=later, timestamp=base + 120_000, partition=0)
    assert producer.flush(30) == 0
    summary = run_processor(settings, "orders", 2, topic=topic, group="g-copies", bounded=True, start="earliest",
                            grace_ms=0, checkpoint_seconds=0.3)
    assert summary.complete
    report = reports(settings, ["2026-01-01"])["2026-01-01"]
    first = report.filter(pl.col("window_start") == dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert first.select("type", "events", "amount").rows() == [("add_to_cart", 1, 3.0)]
    stats_key = keys.report_stats_file("orders", 2, "2026-01-01")
    stats = json.loads(get_bytes(s3_client(settings), settings.s3_bucket, stats_key))  # type: ignore[arg-type]
    assert stats["counted"] == 2 and stats["duplicates"] == 2


# -------------------------------------------------------------------- SIGKILL of either stage


def stage_command(topic: str, group: str, stage: str, bounded: bool) -> list[str]:
    return [
        *(sys.executable, "-m", "workers.cli", "processor", "--pipeline", "orders", "--version", "2"),
        *("--topic", topic, "--group", group, "--stage", stage, "--from-beginning", "--progress", "none"),
        *("--batch-size", "20" if stage == "1" else "10", "--checkpoint-seconds", "0.2"),
        *("--grace-seconds", str(LIVE_GRACE_MS // 1000)),
        *(["--until-end"] if bounded else []),
    ]


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "live"])
def test_sigkill_of_either_stage_loses_and_doubles_nothing(settings: Settings, bounded: bool, tmp_path: Path) -> None:
    topic = settings.events_topic
    produce_events(settings, 16_000, topic=topic, start=START, days=0.25, partitions=4, seed=SEED + 1,
                   faults=dataclasses.replace(FAULTS, rerouted=0.3), keying="user")
    messages = read_topic(settings, topic)
    expected = oracle(messages)
    days = sorted(expected)
    group = "g-kill" if bounded else "g-kill-live"
    prefix = keys.processor_prefix("orders", 2, group if bounded else None)
    client = s3_client(settings)

    ends = kafka_helpers.end_offsets(settings, topic)

    def mid_stream(stage: str) -> bool:
        """Stage 1: some input offsets committed, not all. Stage 2: some results, not all."""
        if stage == "1":
            done = sum(max(offset, 0) for offset in committed_offsets(settings, group, topic, sorted(ends)).values())
            return 0 < done < sum(ends.values())
        if bounded:
            states = list_states(client, settings.s3_bucket, prefix)
            return bool(states) and not all(s["finalized"] for s in states.values())
        return 0 < total(live(settings, days)) < total(expected)

    def start(stage: str) -> subprocess.Popen:
        env = {**os.environ, "KAPPA_INSTANCE_ID": f"kill-{stage}"}
        # a file, not a pipe: a live stage logs for minutes and would block on a pipe nobody drains
        with open(tmp_path / f"stage{stage}.log", "ab") as log:
            return subprocess.Popen(stage_command(topic, group, stage, bounded), env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)

    def log_tail(stage: str) -> str:
        return (tmp_path / f"stage{stage}.log").read_text(errors="replace")[-2000:]

    rng = random.Random(SEED)
    procs = {"1": start("1"), "2": start("2")}
    kills: Counter[str] = Counter()
    try:
        for victim in rng.sample(["1", "1", "2", "2"], 4):
            deadline = time.monotonic() + 60
            while not mid_stream(victim) and procs[victim].poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 0.5))
            if procs[victim].poll() is None:
                landed = mid_stream(victim)  # asked again: the kill below lands mid-stream or not at all
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                kills[victim] += landed
                procs[victim] = start(victim)
        if bounded:
            for stage, proc in procs.items():
                assert proc.wait(timeout=180) == 0, (stage, log_tail(stage))
        else:
            try:
                wait_for(lambda: total(live(settings, days)) >= total(expected), timeout=180)
            except AssertionError:
                raise AssertionError(f"live stages never caught up:\n1: {log_tail('1')}\n2: {log_tail('2')}") from None
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    assert kills["1"] >= 1 and kills["2"] >= 1, f"mid-stream kills: {dict(kills)}; make the input larger"
    results = reports(settings, days) if bounded else live(settings, days)
    assert_matches_oracle(results, expected)


def test_stage1_takes_event_time_only_from_the_live_part_at_a_handoff(settings: Settings) -> None:
    """A record a promoted day's corrected report counts (covered) moves stage 1's position but not
    its source's event time: like the single-stage path, it never touches the live state. Here the
    covered records are newer than the live one, so counting them would make the live one late."""
    from test_pipelines import consumed, event

    from workers.pipelines import get_pipeline
    from workers.processor.engine import split_batch
    from workers.processor.handoff import Switch
    from workers.processor.progress import NoProgress
    from workers.processor.shuffle import SourceProgress, Stage1

    day1 = int(dt.datetime(2026, 1, 1, 23, 59, tzinfo=dt.UTC).timestamp() * 1000)
    day2 = day1 + 3_600_000  # 2026-01-02, promoted: offsets below 2 are covered
    switch = Switch(start={0: 0}, covered={"2026-01-02": {0: 2}})
    pipeline = get_pipeline("orders", 2)
    stage = Stage1(settings, pipeline, topic="t", group="g", bounded=False, start="latest",
                   start_offsets=switch.start, end_offsets=None, grace_ms=60_000, batch_size=10,
                   checkpoint_seconds=1.0, dlq_topic="t.dlq", late_topic="t.late", progress=NoProgress(),
                   stop=threading.Event(), switch=switch, repartition="t-r", partitions_out=1, instance="i")
    stage.positions[0], stage.source_progress[0] = 0, SourceProgress()
    rng = random.Random(3)
    messages = [consumed(0, i, ts, event(i, rng)) for i, ts in enumerate((day2, day2 + 5, day1))]
    batch = split_batch(messages, pipeline)
    frame = stage.with_source(stage.keep_new(batch.frame), [])  # live: a record is its own source
    live = stage.not_covered(frame)
    stage.note_progress(frame, live)
    assert live["offset"].to_list() == [2]
    assert stage.positions[0] == 3 and stage.source_progress[0].max_ts == day1


def test_end_offsets_count_records_behind_an_open_transaction(settings: Settings, topic_factory) -> None:
    """A killed stage 1 leaves its transaction open until it times out. The end offsets every "caught
    up" check compares with must still count the records committed after it (the high watermark, not
    the last stable offset the broker answers a read_committed client), or a reader stopped at the
    open transaction looks done while committed records wait behind it."""
    topic = topic_factory("open-txn", partitions=1)
    hanging = Producer(settings.kafka_config(**{"transactional.id": f"{topic}-hanging"}))
    hanging.init_transactions(30)
    hanging.begin_transaction()
    hanging.produce(topic, b"open", partition=0)
    hanging.flush(30)
    committed = Producer(settings.kafka_config(**{"transactional.id": f"{topic}-committed"}))
    committed.init_transactions(30)
    committed.begin_transaction()
    for n in range(5):
        committed.produce(topic, str(n).encode(), partition=0)
    committed.commit_transaction(30)
    probe = Consumer(settings.kafka_config(**{"group.id": f"{topic}-probe", "isolation.level": "read_committed"}))
    try:
        stable = probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)[1]
    finally:
        probe.close()
    assert stable == 0, "the broker no longer holds the last stable offset at an open transaction"
    assert kafka_helpers.end_offsets(settings, topic) == {0: 7}  # 1 open + 5 committed + 1 commit marker
    hanging.abort_transaction(30)


def test_stage1_reads_archive_coordinates_and_ships_headers_byte_exact() -> None:
    """Only a record ending in the loader's two ``kappa.src.*`` headers takes the archive's coordinates
    (other headers may hold anything); shipped headers come back as they were, None values included,
    and so do the list-of-structs headers an earlier release left in a repartition topic."""
    from workers.processor.shuffle import (
        HEADERS_ENCODER,
        SRC_OFFSET,
        SRC_PARTITION,
        raw_headers,
        with_archive_source,
    )
    from workers.replay.producer import SRC_OFFSET_HEADER, SRC_PARTITION_HEADER

    frame = pl.DataFrame({"partition": [0, 1, 2, 3], "offset": [10, 11, 12, 13]},
                         schema={"partition": pl.Int32, "offset": pl.Int64})
    headers = [
        [("trace", b"\xff\x00"), (SRC_PARTITION_HEADER, b"5"), (SRC_OFFSET_HEADER, b"123456789012")],
        None,
        [("a", b"not a number"), ("b", None)],
        [(SRC_OFFSET_HEADER, b"7"), (SRC_PARTITION_HEADER, b"1")],  # wrong order: not the loader's
    ]
    coordinates = with_archive_source(frame, headers).select(SRC_PARTITION, SRC_OFFSET).rows()
    assert coordinates == [(5, 123456789012), (1, 11), (2, 12), (3, 13)]
    for original in headers:
        shipped = None if original is None else HEADERS_ENCODER.encode(original)
        assert raw_headers(shipped) == (original or [])
    legacy = [{"name": "trace", "value": b"\xff"}, {"name": "n", "value": None}]
    assert raw_headers(legacy) == [("trace", b"\xff"), ("n", None)]


def test_stage1_aligns_sources_in_event_time_and_stays_exact(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Stage 2 holds a window open until the slowest source passed it, so stage 1 pauses a source that
    runs far ahead in event time. Partition 0 spreads its events over the day, partition 1 packs most
    of its own into the first hour: read at a similar record pace, partition 0 runs hours ahead.
    The pauses must land, and the report must still equal the independent oracle."""
    from workers.processor import shuffle

    topic = f"{settings.events_topic}.skewed"
    kafka_helpers.ensure_topic(settings, topic, 2)
    # small fetches interleave the partitions; a low bound makes a few hundred records "far ahead"
    monkeypatch.setattr(shuffle, "SHUFFLE_PREFETCH", {"max.partition.fetch.bytes": 4096,
                                                      "queued.max.messages.kbytes": 64})
    monkeypatch.setattr(shuffle, "ALIGN_RECORDS", 100)
    day = int(dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
    rng = random.Random(5)
    times = {0: sorted(day + rng.randrange(86_400_000) for _ in range(3000)),
             1: sorted([day + rng.randrange(3_600_000) for _ in range(2700)]
                       + [day + rng.randrange(86_400_000) for _ in range(300)])}
    producer = Producer(settings.kafka_config(**{"linger.ms": 20}))
    for partition, stamps in times.items():
        for n, ts in enumerate(stamps):
            event_id = f"e{rng.randrange(4000)}"  # copies across partitions: dedup must still hold
            value = json.dumps({"event_id": event_id, "user_id": f"u{n % 7}", "type": rng.choice(sorted(TYPES)),
                                "amount": rng.randrange(1, 100)}).encode()
            producer.produce(topic, value=value, timestamp=ts, partition=partition)
    assert producer.flush(30) == 0
    messages = read_topic(settings, topic)
    expected = oracle(messages)

    with caplog.at_level("INFO", logger="kappa.shuffle"):
        summary = run_processor(settings, "orders", 2, topic=topic, group="g-aligned", bounded=True,
                                start="earliest", grace_ms=0, batch_size=50, checkpoint_seconds=0.3)
    pauses = [r for r in caplog.records if "records ahead of the slowest source" in r.getMessage()]
    assert pauses, "stage 1 never paused the partition running ahead"
    assert any("[0]" in r.getMessage() for r in pauses)
    assert summary.complete and summary.records == 6000 and summary.late_records == 0
    assert_matches_oracle(reports(settings, sorted(expected)), expected)


def test_stage1_aborts_and_redoes_a_transaction_librdkafka_made_abortable(
    settings: Settings, unique: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """librdkafka can move stage 1's open transaction into an abortable error on its own thread: a
    delivery the broker refused, or "skipped sequence numbers" after a broker restart. Stage 1's next
    produce is then refused with ``_STATE``, wherever it runs (``process``, ``commit``, a callback).
    Here the broker refuses every shipped batch for a while (the repartition topic's
    max.message.bytes lowered before the events arrive, restored after three refusals): each refusal
    must abort the transaction and redo from the committed offsets, and the live results must still
    equal the independent oracle."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    from workers.pipelines import get_pipeline
    from workers.processor.shuffle import MAX_MESSAGE_BYTES

    # a new group: an earlier run's repartition topic would be replaced after we lowered its limit
    topic, group = settings.events_topic, unique("g-refused")
    kafka_helpers.ensure_topic(settings, topic, 2)
    repartition = keys.repartition_topic(group, get_pipeline("orders", 2).state_key)
    admin = kafka_helpers.admin_client(settings)
    refusals = threading.Semaphore(0)

    class Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "produce refused" in record.getMessage():
                refusals.release()

    def limit(max_bytes: int) -> None:
        entry = ConfigEntry("max.message.bytes", str(max_bytes), incremental_operation=AlterConfigOpType.SET)
        resource = ConfigResource(ConfigResource.Type.TOPIC, repartition, incremental_configs=[entry])
        admin.incremental_alter_configs([resource])[resource].result(timeout=30)

    handler = Refusals()
    logging.getLogger("kappa.shuffle").addHandler(handler)
    caplog.set_level("WARNING", logger="kappa.shuffle")
    stop, thread, result = run_live(settings, topic, group)
    try:
        wait_for(lambda: kafka_helpers.exists(admin, repartition, 10), timeout=60)
        limit(200)  # below any shipped batch: the broker refuses them (MESSAGE_TOO_LARGE)
        produce_events(settings, 5_000, topic=topic, start=START, days=0.25, partitions=2, seed=SEED + 2,
                       faults=FAULTS, keying="user")
        landed = sum(refusals.acquire(timeout=60) for _ in range(3))
        limit(MAX_MESSAGE_BYTES)
        expected = oracle(read_topic(settings, topic))
        wait_for(lambda: total(live(settings, sorted(expected))) >= total(expected), timeout=120)
    finally:
        stop.set()
        thread.join(60)
        logging.getLogger("kappa.shuffle").removeHandler(handler)
    assert landed == 3, f"{landed} refused produces of 3: the fault did not land"
    refused = [r.getMessage() for r in caplog.records if "produce refused" in r.getMessage()]
    assert refused and all("transaction aborted" in m and "redoing" in m for m in refused), refused
    assert result
    assert_late_only_stale_copies(settings, topic, read_topic(settings, topic), result[0].late_records)
    assert_matches_oracle(live(settings, sorted(expected)), expected)


def test_a_fenced_stage1_ends_instead_of_fencing_its_successor(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    """A stage 1 whose transactional id a newer producer took over (a restart with the same
    ``--instance-id`` while the old process was only paused) must end when its abort fails as
    fenced: a new producer would init the same id and fence the successor back. The successor's
    transaction still commits afterwards."""
    from workers.errors import KappaError
    from workers.pipelines import get_pipeline
    from workers.processor.progress import NoProgress
    from workers.processor.shuffle import Stage1

    topic, group = unique("fenced-out"), unique("g-fenced")
    kafka_helpers.ensure_topic(settings, topic, 1)
    stage = Stage1(settings, get_pipeline("orders", 2), topic=topic, group=group, bounded=False, start="latest",
                   start_offsets=None, end_offsets=None, grace_ms=None, batch_size=10, checkpoint_seconds=1.0,
                   dlq_topic=f"{topic}.dlq", late_topic=f"{topic}.late", progress=NoProgress(),
                   stop=threading.Event(), switch=None, repartition=topic, partitions_out=1, instance="i")
    stage.new_producer()
    assert stage.producer is not None
    stage.producer.begin_transaction()
    stage.producer.produce(topic, b"from the paused one")
    successor = Producer(stage.producer_config())
    successor.init_transactions(30)  # takes the transactional id over: the paused one is fenced
    with pytest.raises(KappaError, match="stage 1 transaction failed"):
        stage.abort_and_rewind()
    successor.begin_transaction()
    successor.produce(topic, b"from the successor")
    successor.commit_transaction(30)  # raises if the paused one had fenced it back
