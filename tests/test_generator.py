"""The event generator: deterministic, faults as requested, and what reaches Kafka is what it yields."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections import Counter

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from workers import kafka as kafka_helpers
from workers.config import Settings
from workers.dev.generator import (
    EVENT_TYPES,
    MALFORMED_SORTS,
    Faults,
    Record,
    generate,
    is_malformed,
    parse_start,
    produce_events,
)
from workers.errors import KappaError

START_MS = 1_795_000_000_000  # 2026-11-18T...Z
FAULTS = Faults(duplicates=0.1, late=0.1, malformed=0.1)


def valid_event(value: bytes | None) -> bool:
    """The reference pipeline's rules (docs/ARCHITECTURE.md), written independently of the generator."""
    try:
        event = json.loads(value.decode("utf-8"))  # type: ignore[union-attr]
    except (AttributeError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(event, dict)
        and isinstance(event.get("event_id"), str)
        and isinstance(event.get("user_id"), str)
        and event.get("type") in EVENT_TYPES
        and isinstance(event.get("amount"), int | float)
        and not isinstance(event.get("amount"), bool)
    )


def test_same_seed_same_records_other_seed_other_records() -> None:
    first = list(generate(3000, start_ms=START_MS, seed=7, faults=FAULTS))
    assert first == list(generate(3000, start_ms=START_MS, seed=7, faults=FAULTS))
    assert first != list(generate(3000, start_ms=START_MS, seed=8, faults=FAULTS))


def test_fault_shares_roughly_as_requested_and_every_malformed_sort_present() -> None:
    records = list(generate(20_000, start_ms=START_MS, seed=1, faults=FAULTS))
    kinds = Counter("malformed" if is_malformed(r.kind) else r.kind for r in records)
    for kind in ("duplicate", "late", "malformed"):
        assert 1600 <= kinds[kind] <= 2400, kinds
    assert {r.kind for r in records if is_malformed(r.kind)} == {f"malformed.{s}" for s in MALFORMED_SORTS}
    assert 200 <= sum(r.key is None for r in records) <= 600  # 2 % null keys by default
    assert 5000 <= sum(bool(r.headers) for r in records) <= 7000  # 30 % with headers


def test_each_kind_is_what_it_claims() -> None:
    records = list(generate(20_000, start_ms=START_MS, seed=2, faults=FAULTS))
    seen: dict[bytes, Record] = {}
    for index, record in enumerate(records):
        stream_ms = START_MS + index * 86_400_000 // len(records)
        if is_malformed(record.kind):
            assert not valid_event(record.value), record
            continue
        assert valid_event(record.value), record
        if record.kind == "duplicate":
            original = seen[record.value]  # type: ignore[index]
            assert (original.key, original.timestamp_ms, original.headers) == (
                record.key, record.timestamp_ms, record.headers)
        else:
            assert record.value not in seen  # event ids are unique outside duplicates
            seen[record.value] = record  # type: ignore[index]
        if record.kind == "late":
            assert 60_000 <= stream_ms - record.timestamp_ms <= 6 * 3_600_000
        if record.kind == "valid":
            assert 0 <= stream_ms - record.timestamp_ms < 1000
        if record.key is not None:
            assert json.loads(record.value)["user_id"].encode() == record.key  # type: ignore[arg-type]
    assert any(r.value is None for r in records) and any(r.value == b"" for r in records)


def test_timestamps_never_zero_because_librdkafka_reads_zero_as_now() -> None:
    records = list(generate(100, start_ms=0, span_ms=10, seed=3, faults=Faults(late=0.5)))
    assert min(r.timestamp_ms for r in records) == 1


def test_parse_start() -> None:
    assert parse_start("2026-11-20", 1) == int(dt.datetime(2026, 11, 20, tzinfo=dt.UTC).timestamp() * 1000)
    assert parse_start("2026-11-20T01:00:00+01:00", 1) == parse_start("2026-11-20", 1)
    now = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)
    assert parse_start(None, 2, now=now) == int(dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC).timestamp() * 1000)
    with pytest.raises(KappaError, match="not an ISO date"):
        parse_start("yesterday", 1)
    with pytest.raises(KappaError, match="must not exceed 1"):
        Faults(duplicates=0.6, late=0.6).validate()


def read_topic(settings: Settings, topic: str) -> list[tuple]:
    """Every record of the topic as (key, value, timestamp, headers), read with a plain consumer."""
    ends = kafka_helpers.end_offsets(settings, topic)
    consumer = Consumer(settings.kafka_config(**{"group.id": "unused", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    rows, deadline = [], time.monotonic() + 60
    try:
        while len(rows) < sum(ends.values()) and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=1):
                assert message.error() is None
                rows.append((message.key(), message.value(), message.timestamp()[1], message.headers() or []))
    finally:
        consumer.close()
    return rows


def test_produce_events_sends_exactly_what_generate_yields(settings: Settings) -> None:
    summary = produce_events(settings, 5000, start=START_MS, partitions=4, seed=11, faults=FAULTS)
    expected = list(generate(5000, start_ms=START_MS, seed=11, faults=FAULTS))
    assert kafka_helpers.partition_count(settings, settings.events_topic) == 4
    assert summary.count == summary.delivered == 5000 and summary.failed == 0
    assert summary.kinds == Counter(r.kind for r in expected)
    assert summary.malformed == sum(is_malformed(r.kind) for r in expected)
    got = read_topic(settings, settings.events_topic)

    def canonical(rows):
        return sorted(rows, key=repr)

    assert canonical(got) == canonical([(r.key, r.value, r.timestamp_ms, r.headers) for r in expected])


def test_rate_limits_throughput(settings: Settings) -> None:
    summary = produce_events(settings, 3000, rate=2000, start=START_MS, seed=1)
    assert summary.seconds >= 1.4 and summary.seed == 1


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_produce_counts_and_creates_the_topic(settings: Settings) -> None:
    result = run_cli("produce", "-n", "3000", "--seed", "5", "--start", "2026-11-20", "--days", "2",
                     "--partitions", "3", "--malformed", "0.2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "malformed.not_json" in result.stdout and "2026-11-20, 2026-11-21" in result.stdout
    assert sum(kafka_helpers.end_offsets(settings, settings.events_topic).values()) == 3000
    assert kafka_helpers.partition_count(settings, settings.events_topic) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duplicates", "1.5"], "--duplicates must be a share between 0 and 1"),
        (["--start", "soon"], "--start 'soon' is not an ISO date"),
        (["--partitions", "0"], "--partitions must be >= 1"),
        (["--late", "0.6", "--malformed", "0.6"], "must not exceed 1"),
    ],
)
def test_cli_produce_bad_options_print_one_line(settings: Settings, args: list[str], message: str) -> None:
    result = run_cli("produce", "-n", "10", "--quiet", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_keyings_change_only_the_keys_and_rerouted_duplicates_take_another_key() -> None:
    """The same seed gives the same values, timestamps, headers and kinds whatever the keying."""
    faults = Faults(duplicates=0.2, late=0.05, malformed=0.05)
    runs = {k: list(generate(3000, start_ms=START_MS, seed=5, faults=faults, keying=k))
            for k in ("user", "none", "random", "event-id")}
    rerouted = list(generate(3000, start_ms=START_MS, seed=5, faults=Faults(**{**faults.__dict__, "rerouted": 0.3})))
    plain = [r._replace(key=None) for r in runs["user"]]
    for records in [*runs.values(), rerouted]:
        assert [r._replace(key=None) for r in records] == plain
    assert all(r.key is None for r in runs["none"])
    valid = [(r, json.loads(r.value)) for r in runs["event-id"] if r.kind == "valid"]
    assert all(r.key == body["event_id"].encode() for r, body in valid)
    assert len({r.key for r in runs["random"] if r.kind == "valid"}) == sum(r.kind == "valid" for r in runs["random"])
    moved = [a for a, b in zip(rerouted, runs["user"], strict=True) if a.key != b.key]
    duplicates = sum(r.kind == "duplicate" for r in rerouted)
    assert moved and all(r.kind == "duplicate" and r.key.startswith(b"session-") for r in moved)  # type: ignore[union-attr]
    assert 0.2 < len(moved) / duplicates < 0.4
    with pytest.raises(KappaError, match="--keying"):
        list(generate(1, start_ms=START_MS, keying="by-magic"))
