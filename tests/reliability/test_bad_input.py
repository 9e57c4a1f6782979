"""Bad input: property-based fuzzing of values, keys, headers and timestamps (hypothesis).

1. Pipeline level (fast, many examples): ``parse`` never raises, gives one row per value, rejects
   exactly what the independent `orders` rules reject, and the batch fast path agrees with the
   value-by-value path.
2. End to end (real broker + S3, seeded, 240 records by default, 2400 in the soak run): hostile
   records go through the real archiver, processor, replay loader and bounded processor; all exit 0,
   every record is archived byte-exact, every bad record is in the DLQ with a reason, and the reports
   count exactly the valid ones. The seed and a sample are recorded in the figures.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import polars as pl
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers import kafka as kafka_helpers
from workers.config import Settings
from workers.pipelines import get_pipeline

from . import fuzz
from .harness import ARCHIVER_ARGS, Workers, bounded_args, load_args, replay_spec
from .invariants import (
    FIGURES,
    archive_days,
    assert_archive_exact,
    assert_dlq_exact,
    assert_replay_topic_exact,
    assert_reports_exact,
    parse_order,
    read_report,
    utc_day,
)

UNIT_EXAMPLES, UNIT_EXAMPLES_SOAK = 150, 2000
UNIT_HEALTH = [HealthCheck.too_slow]


def with_examples(prop: Callable[[], Callable[..., None]], examples: int, health: list[HealthCheck],
                  soak: bool = False) -> Callable[..., None]:
    """A fresh copy of the property ``prop()`` with an example budget (``soak``: marked, many more examples)."""
    wrapped = settings(max_examples=examples, deadline=None, suppress_health_check=health)(prop())
    return pytest.mark.soak(wrapped) if soak else wrapped


def parse_property(values: list[bytes | None], version: int) -> None:
    """``parse`` never raises, rejects exactly the bad values (with a reason), batch == one by one."""
    pipeline = get_pipeline("orders", version)
    batch = pipeline.parse(values)
    FIGURES.count("fuzz_parse_values", len(values))
    assert batch.height == len(values)
    for value, reject in zip(values, batch["reject"].to_list(), strict=True):
        assert (reject is None) == (parse_order(value) is not None), (value[:200] if value else value, reject)
        assert reject is None or reject.strip(), "a rejected value needs a reason"
    one_by_one = pl.concat([pipeline.parse([value]) for value in values])
    assert batch.equals(one_by_one), "the batch fast path and the per-value path disagree"


def parse_test() -> Callable[..., None]:
    return given(fuzz.batches, st.sampled_from([1, 2]))(parse_property)


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


def produced_and_labelled(settings_: Settings, seed: int, count: int, huge: int) -> list[fuzz.Generated]:
    """Generate ``count`` seeded hostile records, produce them, record the example in the figures."""
    batch = fuzz.generate(random.Random(seed), count, int(time.time() * 1000), huge=huge)
    produce_raw(settings_, settings_.events_topic, [item.record for item in batch])
    for item in batch:  # the generator's verdict, the independent rules' verdict: the same
        assert (parse_order(item.record.value) is not None) == item.valid, (item.category, item.record.value[:200])
    FIGURES.fault("fuzz.records", len(batch))
    FIGURES.note("fuzz_example", fuzz.example(seed, batch))
    return batch


def valid_on(batch: list[fuzz.Generated], day: str) -> int:
    """How many records the generator made valid on ``day``: what a v1 report of that day must count."""
    return sum(item.valid and utc_day(item.record.timestamp_ms) == day for item in batch)


@pytest.mark.parametrize("count,huge", [pytest.param(240, 2, id="240-records"),
                                        pytest.param(2400, 6, id="2400-records", marks=pytest.mark.soak)])
def test_end_to_end_hostile_records_through_archiver_processor_and_replay(
    settings: Settings, s3, workers: Workers, seed: int, count: int, huge: int
) -> None:
    """Seeded hostile records through the real archiver, processor, replay loader and bounded processor:
    the archive is byte-exact, every malformed record is in the DLQ with a reason, the reports count
    exactly the valid ones (vs the pipeline's batch report, the independent rules, and the generator)."""
    batch = produced_and_labelled(settings, seed, count, huge)
    workers.run("archiver", *ARCHIVER_ARGS, "--until-end", timeout=300)
    assert_archive_exact(settings, s3)
    group = f"kappa.orders.v2.fuzz.{settings.events_topic}"
    workers.run("processor", "processor", "-p", "orders", "-v", "2", "--group", group, "--from-beginning",
                "--until-end", "--progress", "log", timeout=300)
    assert_dlq_exact(settings, s3, settings.dlq_topic)
    assert_reports_exact(settings, s3, 2, archive_days(s3, settings.s3_bucket, settings.events_topic))

    spec = replay_spec(settings, version=1, day=fuzz.FUZZ_DAY)
    workers.run("load", *load_args(spec), timeout=300)
    workers.run("bounded", *bounded_args(spec), timeout=300)
    assert_replay_topic_exact(settings, s3, settings.events_topic, spec.topic, spec.day)
    assert_reports_exact(settings, s3, 1, [spec.day])
    assert_dlq_exact(settings, s3, spec.dlq_topic, spec.day)
    report, _stats = read_report(s3, settings.s3_bucket, 1, spec.day)
    assert int(report["events"].sum() or 0) == valid_on(batch, spec.day)
    FIGURES.count("fuzz_records_end_to_end", len(batch))
