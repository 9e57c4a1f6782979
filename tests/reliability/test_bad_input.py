"""Bad input: property-based fuzzing of values, keys, headers and timestamps (hypothesis).

1. Pipeline level (fast, many examples): ``parse`` never raises, gives one row per value, rejects
   exactly what the independent DESIGN §3 rules reject, and the batch fast path agrees with the
   value-by-value path.
2. End to end (real broker + S3, a few examples): hostile records go through the real archiver and the
   real processor; both exit 0, every record is archived byte-exact, every bad record is in the DLQ
   with a reason, and the reports count exactly the valid ones.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace

import polars as pl
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.pipelines import get_pipeline

from . import fuzz
from .harness import ARCHIVER_ARGS, Workers
from .invariants import (
    FIGURES,
    archive_days,
    assert_archive_exact,
    assert_dlq_exact,
    assert_reports_exact,
    parse_order,
)

UNIT_EXAMPLES, UNIT_EXAMPLES_SOAK = 150, 2000
E2E_EXAMPLES, E2E_EXAMPLES_SOAK = 3, 12
UNIT_HEALTH = [HealthCheck.too_slow]
E2E_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
              HealthCheck.large_base_example]


def with_examples(prop: Callable[[], Callable[..., None]], examples: int, health: list[HealthCheck],
                  soak: bool = False) -> Callable[..., None]:
    """A fresh copy of the property ``prop()`` with an example budget (``soak``: marked, many more examples)."""
    wrapped = settings(max_examples=examples, deadline=None, suppress_health_check=health)(prop())
    return pytest.mark.soak(wrapped) if soak else wrapped


def parse_property(values: list[bytes | None], version: int) -> None:
    """``parse`` never raises, rejects exactly the bad values (with a reason), batch == one by one."""
    pipeline = get_pipeline("orders", version)
    batch = pipeline.parse(values)
    FIGURES.fuzz_examples += 1
    assert batch.height == len(values)
    for value, reject in zip(values, batch["reject"].to_list(), strict=True):
        assert (reject is None) == (parse_order(value) is not None), (value[:200] if value else value, reject)
        assert reject is None or reject.strip(), "a rejected value needs a reason"
    one_by_one = pl.concat([pipeline.parse([value]) for value in values])
    assert batch.equals(one_by_one), "the batch fast path and the per-value path disagree"


def parse_test() -> Callable[..., None]:
    return given(st.lists(fuzz.values, min_size=1, max_size=15), st.sampled_from([1, 2]))(parse_property)


test_parse_never_raises_and_rejects_exactly_the_bad_values = with_examples(parse_test, UNIT_EXAMPLES, UNIT_HEALTH)
test_parse_never_raises_and_rejects_exactly_the_bad_values_soak = with_examples(
    parse_test, UNIT_EXAMPLES_SOAK, UNIT_HEALTH, soak=True)


def produce_raw(settings_: Settings, topic: str, batch: list[fuzz.FuzzRecord]) -> None:
    """Send the records as they are (no generator): a producer allowed to send near-limit values."""
    kafka_helpers.ensure_topic(settings_, topic, 2)
    producer = Producer(settings_.kafka_config(**{"message.max.bytes": 4_194_304, "enable.idempotence": True}))
    errors: list[str] = []
    for record in batch:
        producer.produce(topic, key=record.key, value=record.value, headers=record.headers or None,
                         timestamp=record.timestamp_ms,
                         on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
        producer.poll(0)
    assert producer.flush(60) == 0 and not errors, errors[:3]


@pytest.fixture
def fresh(settings: Settings, s3) -> object:
    """Per-example names: a new bucket and topics for every hypothesis example."""

    def make() -> tuple[Settings, dict[str, str]]:
        tag = uuid.uuid4().hex[:8]
        example = replace(settings, s3_bucket=f"kappa-fuzz-{tag}", events_topic=f"fuzz-{tag}",
                          dlq_topic=f"fuzz-{tag}.dlq")
        s3_helpers.ensure_bucket(s3, example.s3_bucket)
        env = {"KAPPA_S3_BUCKET": example.s3_bucket, "KAPPA_EVENTS_TOPIC": example.events_topic,
               "KAPPA_DLQ_TOPIC": example.dlq_topic}
        return example, env

    return make


def hostile_records_property(batch: list[fuzz.FuzzRecord], fresh, s3, workers: Workers) -> None:
    """Hostile records through the real archiver and processor: exits 0, archive/DLQ/reports exact."""
    example, env = fresh()
    produce_raw(example, example.events_topic, batch)
    FIGURES.fuzz_examples += 1
    FIGURES.fault("bad_input.records", len(batch))
    workers.run(f"archiver-{example.events_topic}", *ARCHIVER_ARGS, "--until-end", env=env, timeout=180)
    group = f"kappa.orders.v2.fuzz.{example.events_topic}"
    workers.run(f"processor-{example.events_topic}", "processor", "-p", "orders", "-v", "2", "--group", group,
                "--from-beginning", "--until-end", "--progress", "log", env=env, timeout=180)
    assert_archive_exact(example, s3)
    assert_dlq_exact(example, s3, example.dlq_topic)
    assert_reports_exact(example, s3, 2, archive_days(s3, example.s3_bucket, example.events_topic))


def hostile_test() -> Callable[..., None]:
    return given(batch=fuzz.records())(example(batch=fuzz.NEAR_LIMIT_EXAMPLE)(hostile_records_property))


test_hostile_records_are_archived_dead_lettered_and_never_counted = with_examples(
    hostile_test, E2E_EXAMPLES, E2E_HEALTH)
test_hostile_records_are_archived_dead_lettered_and_never_counted_soak = with_examples(
    hostile_test, E2E_EXAMPLES_SOAK, E2E_HEALTH, soak=True)
