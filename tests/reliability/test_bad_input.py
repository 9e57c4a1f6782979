"""Bad input: property-based fuzzing of values, keys, headers and timestamps (hypothesis).

1. Pipeline level (fast, many examples): ``parse`` never raises, gives one row per value, rejects
   exactly what the independent DESIGN §3 rules reject, and the batch fast path agrees with the
   value-by-value path.
2. End to end (real broker + S3, a few examples): hostile records go through the real archiver and the
   real processor; both exit 0, every record is archived byte-exact, every bad record is in the DLQ
   with a reason, and the reports count exactly the valid ones.
"""

from __future__ import annotations

import os
import uuid
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

SOAK = os.environ.get("KAPPA_RELIABILITY_SOAK") == "1"
UNIT_EXAMPLES = 2000 if SOAK else 150
E2E_EXAMPLES = 12 if SOAK else 3


@settings(max_examples=UNIT_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fuzz.values, min_size=1, max_size=15), st.sampled_from([1, 2]))
def test_parse_never_raises_and_rejects_exactly_the_bad_values(values: list[bytes | None], version: int) -> None:
    pipeline = get_pipeline("orders", version)
    batch = pipeline.parse(values)
    FIGURES.fuzz_examples += 1
    assert batch.height == len(values)
    for value, reject in zip(values, batch["reject"].to_list(), strict=True):
        assert (reject is None) == (parse_order(value) is not None), (value[:200] if value else value, reject)
        assert reject is None or reject.strip(), "a rejected value needs a reason"
    one_by_one = pl.concat([pipeline.parse([value]) for value in values])
    assert batch.equals(one_by_one), "the batch fast path and the per-value path disagree"


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


@settings(max_examples=E2E_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(batch=fuzz.records())
@example(batch=fuzz.NEAR_LIMIT_EXAMPLE)
def test_hostile_records_are_archived_dead_lettered_and_never_counted(
    batch: list[fuzz.FuzzRecord], fresh, s3, workers: Workers
) -> None:
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
