"""The one check every reliability test ends with, plus the figures the suite reports.

* :func:`assert_archive_exact`: every record of the topic has a byte-exact row in the raw archive
  (key, value, headers, timestamp), compared with a plain consumer read of the topic; no row is extra
  (an offset the topic never had) or differs from the topic's bytes; overlapping copies left by a
  crash are counted apart (readers drop them) and reported. Every object sits under the day of its
  records and is named by its real offset range.
* :func:`assert_report_exact`: a report equals the pipeline's own ``batch_report`` over the archive
  *and* an independent plain-Python/polars computation written here from the `orders` rules.
* :data:`FIGURES` accumulates landed faults, records checked, missing/extra/repeated counts and
  measured samples; the session writes them to JSON (see ``conftest.py``), and docs/RELIABILITY.md
  is generated from the JSON of green runs (``render_doc.py``).

Nothing here uses the archiver's or the processor's code to decide what is right.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from confluent_kafka import Consumer, KafkaError, TopicPartition

from workers.config import Settings

#: ``(partition, offset)``: the identity of a Kafka record inside one topic.
RecordId = tuple[int, int]
#: Everything a producer controls about a record: timestamp type and ms, key, value, headers.
RecordBody = tuple[int, int, bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...]]

RAW_KEY = re.compile(
    r"^raw/(?P<topic>[^/]+)/dt=(?P<day>\d{4}-\d{2}-\d{2})/part=(?P<partition>\d+)/"
    r"(?P<first>\d{20})-(?P<last>\d{20})\.parquet$"
)
ARCHIVE_SCHEMA = {
    "topic": pl.String,
    "partition": pl.Int32,
    "offset": pl.Int64,
    "timestamp": pl.Datetime("ms", "UTC"),
    "timestamp_type": pl.Int8,
    "key": pl.Binary,
    "value": pl.Binary,
    "headers": pl.List(pl.Struct({"key": pl.String, "value": pl.Binary})),
}
ORDER_TYPES = frozenset({"page_view", "add_to_cart", "purchase", "refund"})
MAX_ABS_AMOUNT = 1e15
#: JSON nested deeper than this is rejected. Parsers' exact limits differ (~1000 levels, the Python
#: recursion limit); the fuzzer draws depths <= 200 or >= 5000 so the verdict never depends on them.
MAX_DEPTH = 1000


# ---------------------------------------------------------------- figures

#: The lost/duplicated/extra/corrupted summaries of the figures: which detailed counters they add up.
SUMMARIES = {
    "lost": ("archive_missing_rows", "replay_missing", "report_events_missing", "dlq_missing"),
    "duplicated": ("replay_repeated", "report_events_extra"),
    "extra": ("archive_extra_rows", "dlq_unexpected"),
    "corrupted": ("archive_differing_rows", "replay_differing", "dlq_altered"),
}


@dataclass
class Figures:
    """What the suite did and measured, summed over the session and kept per test (written to JSON).

    * :meth:`count` — named counters of the checks (records checked, rows missing, ...);
    * :meth:`fault` — one fault that *landed* (call it only after asserting so), e.g. ``sigkill.archiver``,
      ``broker_restart.archive``, ``s3_outage.archiver``, ``zombie.processor`` (one zombie round);
    * :meth:`sample` — a measured value, e.g. ``takeover_s.archiver`` (seconds from kill -9 to the
      restarted member working again); the doc shows median and max per name;
    * :meth:`note` — a structured figure, e.g. the recorded fuzz example.
    """

    counts: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    fault_details: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    per_test: dict[str, Counter] = field(default_factory=dict)
    current_test: str = ""

    def count(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount
        self._test()[name] += amount

    def fault(self, kind: str, count: int = 1, **detail: Any) -> None:
        """Count ``count`` landed faults of ``kind`` and keep their details (seed, kill point, ...)."""
        self.faults[kind] += count
        self._test()[f"fault:{kind}"] += count
        if detail:
            self.fault_details.append({"kind": kind, "test": self.current_test, **detail})

    def sample(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(round(float(value), 3))

    def note(self, name: str, value: Any) -> None:
        self.notes[name] = value

    def _test(self) -> Counter:
        return self.per_test.setdefault(self.current_test, Counter())

    def as_json(self) -> dict[str, Any]:
        totals = dict(sorted(self.counts.items()))
        for summary, parts in SUMMARIES.items():
            totals[summary] = sum(self.counts[part] for part in parts)
        return {
            "totals": totals,
            "faults_landed": sum(self.faults.values()),
            "faults": dict(sorted(self.faults.items())),
            "samples": {name: values for name, values in sorted(self.samples.items())},
            "notes": self.notes,
            "tests": {test: dict(sorted(c.items())) for test, c in sorted(self.per_test.items()) if test},
            "fault_details": self.fault_details,
        }


FIGURES = Figures()


def record_figure(name: str, value: float) -> None:
    """Record one measured value (e.g. ``record_figure("takeover_s.processor", 2.4)``) for the doc."""
    FIGURES.sample(name, value)


# ---------------------------------------------------------------- plain reads


def _headers(raw: Iterable[Any] | None) -> tuple[tuple[str, bytes | None], ...]:
    """Headers from confluent-kafka tuples or archive structs, as a comparable tuple (None -> ())."""
    if not raw:
        return ()
    return tuple((h["key"], h["value"]) if isinstance(h, dict) else (h[0], h[1]) for h in raw)


def read_topic(settings: Settings, topic: str, timeout: float = 120.0) -> dict[RecordId, RecordBody]:
    """Every record of ``topic`` from offset 0 to the end offsets read now, with a plain consumer."""
    import time

    consumer = Consumer(settings.kafka_config(**{
        "group.id": "kappa.reliability.reader", "enable.auto.commit": False, "enable.partition.eof": True,
    }))
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = sorted(metadata.topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in partitions}
        pending = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in pending])
        records: dict[RecordId, RecordBody] = {}
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"reading {topic} did not reach the end offsets {ends} within {timeout:.0f}s")
            for message in consumer.consume(num_messages=5000, timeout=1.0):
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(f"reading {topic}: {error}")
                p = message.partition()
                if error is None and message.offset() < ends[p]:
                    kind, stamp = message.timestamp()
                    records[(p, message.offset())] = (kind, stamp, message.key(), message.value(),
                                                      _headers(message.headers()))
                if message.offset() + (error is None) >= ends[p]:
                    pending.discard(p)
        return records
    finally:
        consumer.close()


@dataclass
class ArchiveRead:
    """All archive rows of a topic (duplicates included) plus the problems found in the objects."""

    rows: list[tuple[RecordId, RecordBody]]
    objects: int
    problems: list[str]


def list_keys(client: Any, bucket: str, prefix: str = "") -> dict[str, str]:
    """``{key: etag}`` of every object under ``prefix``: a bucket snapshot for "nothing written" checks."""
    found: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = obj["ETag"]
    return found


def read_archive(client: Any, bucket: str, topic: str) -> ArchiveRead:
    """Read every object under ``raw/<topic>/`` with plain polars and check each against its key."""
    rows: list[tuple[RecordId, RecordBody]] = []
    problems: list[str] = []
    names = sorted(list_keys(client, bucket, f"raw/{topic}/"))
    for name in names:
        match = RAW_KEY.match(name)
        if match is None:
            problems.append(f"{name}: not a raw archive object name")
            continue
        body = client.get_object(Bucket=bucket, Key=name)["Body"].read()
        frame = pl.read_parquet(io.BytesIO(body))
        if dict(frame.schema) != ARCHIVE_SCHEMA:
            problems.append(f"{name}: schema {dict(frame.schema)}")
            continue
        problems += _object_problems(name, match, frame, topic)
        for part, off, stamp, kind, key, value, headers in frame.select(
            "partition", "offset", pl.col("timestamp").dt.epoch("ms"), "timestamp_type", "key", "value", "headers"
        ).iter_rows():
            rows.append(((part, off), (kind, stamp, key, value, _headers(headers))))
    return ArchiveRead(rows=rows, objects=len(names), problems=problems)


def _object_problems(name: str, match: re.Match[str], frame: pl.DataFrame, topic: str) -> list[str]:
    """An object's rows must match its key: topic, partition, day of every timestamp, offset range."""
    if frame.is_empty():
        return [f"{name}: empty object"]
    days = frame["timestamp"].dt.date().cast(pl.String).unique().to_list()
    expected = (topic, [int(match["partition"])], [match["day"]], int(match["first"]), int(match["last"]))
    actual = (frame["topic"].unique().to_list(), frame["partition"].unique().to_list(), days,
              frame["offset"].min(), frame["offset"].max())
    topics_ok = actual[0] == [expected[0]]
    return [] if topics_ok and actual[1:] == expected[1:] else [f"{name}: rows say {actual}"]


# ---------------------------------------------------------------- the archive invariant


@dataclass
class ArchiveCheck:
    """How the archive's rows compare with the topic. Every row is exactly one of: the record itself,
    an overlap (a byte-identical extra copy of a topic record, left by a crash; readers drop it), a
    differing row (a topic offset with other bytes) or an extra row (an offset the topic never had)."""

    records: int
    archive_rows: int
    objects: int
    overlap_rows: int
    extra_rows: int
    differing_rows: int
    missing_rows: int
    problems: list[str]


def check_archive(settings: Settings, client: Any, topic: str | None = None) -> ArchiveCheck:
    """Compare the raw archive of ``topic`` with a plain read of the topic (counts only, asserts nothing)."""
    topic = topic or settings.events_topic
    expected = read_topic(settings, topic)
    archive = read_archive(client, settings.s3_bucket, topic)
    exact: Counter[RecordId] = Counter()
    extra = differing = 0
    for rid, body in archive.rows:
        if rid not in expected:
            extra += 1
        elif body != expected[rid]:
            differing += 1
        else:
            exact[rid] += 1
    return ArchiveCheck(
        records=len(expected), archive_rows=len(archive.rows), objects=archive.objects,
        overlap_rows=sum(n - 1 for n in exact.values()), extra_rows=extra, differing_rows=differing,
        missing_rows=sum(1 for rid in expected if rid not in exact), problems=archive.problems,
    )


def assert_archive_exact(settings: Settings, client: Any, topic: str | None = None,
                         figures: Figures | None = FIGURES) -> ArchiveCheck:
    """Every record of the topic is in the archive byte-exact; no extra or differing row; overlaps counted."""
    check = check_archive(settings, client, topic)
    if figures is not None:
        figures.count("records_checked", check.records)
        figures.count("archive_rows_read", check.archive_rows)
        figures.count("archive_overlap_rows", check.overlap_rows)
        figures.count("archive_extra_rows", check.extra_rows)
        figures.count("archive_differing_rows", check.differing_rows)
        figures.count("archive_missing_rows", check.missing_rows)
    assert not check.problems, f"bad archive objects: {check.problems[:5]}"
    assert not check.missing_rows, f"{check.missing_rows} records of the topic have no byte-exact archive row"
    assert not check.extra_rows, f"{check.extra_rows} archive rows are not records of the topic"
    assert not check.differing_rows, f"{check.differing_rows} archive rows differ from the topic's bytes"
    return check


def archive_frame(client: Any, bucket: str, topic: str, day: str | None = None) -> pl.DataFrame:
    """The archive (or one day of it) as one frame, duplicates NOT removed: input to the report checks."""
    prefix = f"raw/{topic}/" + (f"dt={day}/" if day else "")
    frames = [pl.read_parquet(io.BytesIO(client.get_object(Bucket=bucket, Key=name)["Body"].read()))
              for name in sorted(list_keys(client, bucket, prefix)) if name.endswith(".parquet")]
    return pl.concat(frames) if frames else pl.DataFrame(schema=ARCHIVE_SCHEMA)


def archive_days(client: Any, bucket: str, topic: str) -> list[str]:
    return sorted({m["day"] for name in list_keys(client, bucket, f"raw/{topic}/") if (m := RAW_KEY.match(name))})


# ---------------------------------------------------------------- the report invariant


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_order(value: bytes | None) -> dict[str, Any] | None:
    """The `orders` validity rules, restated independently: a JSON object with string ids, known type, finite number."""
    if value is None or nesting_depth(value) > MAX_DEPTH:
        return None
    try:
        body = json.loads(value.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    event_id, user_id, kind, amount = (body.get(k) for k in ("event_id", "user_id", "type", "amount"))
    if not (isinstance(event_id, str) and isinstance(user_id, str) and isinstance(kind, str) and kind in ORDER_TYPES):
        return None
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return None
    if not math.isfinite(float(amount)) or abs(float(amount)) >= MAX_ABS_AMOUNT:
        return None
    if any(_has_lone_surrogate(text) for text in (event_id, user_id)):
        return None
    return {"event_id": event_id, "type": kind, "amount": float(amount)}


def nesting_depth(value: bytes) -> int:
    """Deepest ``[``/``{`` nesting outside JSON strings (a cheap scan; exact for valid JSON)."""
    if value.count(b"[") + value.count(b"{") <= MAX_DEPTH:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for byte in value:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def independent_report(archive: pl.DataFrame, version: int) -> pl.DataFrame:
    """The orders report from raw rows: dedup (partition, offset); v2 also drops repeated event_ids
    within one 1-minute window across partitions, keeping the smallest (timestamp, partition, offset).
    Plain Python parsing, polars grouping."""
    records = archive.unique(subset=["partition", "offset"], keep="first").sort("partition", "offset")
    rows = []
    columns = records.select("partition", "offset", pl.col("timestamp").dt.epoch("ms"), "value")
    for part, offset, stamp, value in columns.iter_rows():
        order = parse_order(value)
        if order is not None and stamp is not None and stamp >= 0:
            rows.append({"partition": part, "offset": offset, "ts": stamp, "window": stamp - stamp % 60_000, **order})
    frame = pl.DataFrame(rows, schema={"partition": pl.Int32, "offset": pl.Int64, "ts": pl.Int64, "window": pl.Int64,
                                       "event_id": pl.String, "type": pl.String, "amount": pl.Float64})
    if version >= 2:
        frame = frame.sort("ts", "partition", "offset").unique(subset=["window", "event_id"], keep="first")
    return (
        frame.group_by("window", "type")
        .agg(pl.len().cast(pl.Int64).alias("events"), pl.col("amount").sum().alias("amount"))
        .select(pl.col("window").cast(pl.Datetime("ms", "UTC")).alias("window_start"), "type", "events", "amount")
        .sort("window_start", "type")
    )


def report_difference(actual: pl.DataFrame, expected: pl.DataFrame) -> tuple[int, int, list[dict[str, Any]]]:
    """(events missing, events extra, differing rows) of ``actual`` vs ``expected``, amounts to 1e-6."""
    keys = ["window_start", "type"]
    joined = expected.join(actual, on=keys, how="full", coalesce=True, suffix="_actual").fill_null(0)
    joined = joined.with_columns((pl.col("events_actual") - pl.col("events")).alias("diff"))
    amount_off = (pl.col("amount_actual") - pl.col("amount")).abs() > 1e-6 + 1e-9 * pl.col("amount").abs()
    bad = joined.filter((pl.col("diff") != 0) | amount_off)
    missing = int(-joined["diff"].clip(upper_bound=0).sum())
    extra = int(joined["diff"].clip(lower_bound=0).sum())
    return missing, extra, bad.head(5).to_dicts()


def assert_report_exact(report: pl.DataFrame, archive: pl.DataFrame, pipeline: Any) -> dict[str, int]:
    """``report`` equals ``pipeline.batch_report`` and the independent computation over ``archive``.

    Returns the reference stats (records, counted, dlq, duplicates, late) for further checks.
    """
    assert report.columns == ["window_start", "type", "events", "amount"], report.columns
    assert report.equals(report.sort("window_start", "type")), "report is not sorted by window_start, type"
    reference, stats = pipeline.batch_report(archive)
    independent = independent_report(archive, pipeline.version)
    for name, expected in (("batch_report", reference), ("independent computation", independent)):
        missing, extra, rows = report_difference(report, expected)
        FIGURES.count("report_events_missing", missing)
        FIGURES.count("report_events_extra", extra)
        assert not rows, f"report differs from the {name}: {missing} events missing, {extra} extra, e.g. {rows}"
    FIGURES.count("reports_checked")
    FIGURES.count("report_rows_checked", report.height)
    FIGURES.count("report_events_checked", int(report["events"].sum() or 0))
    return stats


def utc_day(epoch_ms: int) -> str:
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).date().isoformat()


def merge_counts(target: Mapping[str, int], extra: Mapping[str, int]) -> dict[str, int]:
    return {k: target.get(k, 0) + extra.get(k, 0) for k in set(target) | set(extra)}


# ---------------------------------------------------------------- end-to-end checks (archive -> replay -> reports)

SRC_PARTITION, SRC_OFFSET = "kappa.src.partition", "kappa.src.offset"
DLQ_REASON, DLQ_PARTITION, DLQ_OFFSET = "kappa.dlq.reason", "kappa.dlq.partition", "kappa.dlq.offset"


def archive_records(client: Any, bucket: str, topic: str, day: str | None = None) -> dict[RecordId, RecordBody]:
    """The archive deduplicated by ``(partition, offset)`` (optionally one day), as comparable bodies."""
    rows = read_archive(client, bucket, topic).rows
    return {rid: body for rid, body in rows if day is None or utc_day(body[1]) == day}


def _header(headers: tuple[tuple[str, bytes | None], ...], name: str) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


def assert_replay_topic_exact(settings: Settings, client: Any, source_topic: str, replay_topic: str,
                              day: str) -> int:
    """The replay topic holds every archived record of ``day`` exactly once, byte-exact (plus source headers)."""
    expected = archive_records(client, settings.s3_bucket, source_topic, day)
    seen: Counter[RecordId] = Counter()
    corrupted = []
    for _kind, stamp, key, value, headers in read_topic(settings, replay_topic).values():
        src = (int(_header(headers, SRC_PARTITION) or -1), int(_header(headers, SRC_OFFSET) or -1))
        seen[src] += 1
        original = tuple(h for h in headers if h[0] not in {SRC_PARTITION, SRC_OFFSET})
        if expected.get(src, (None, None, None, None, None))[1:] != (stamp, key, value, original):
            corrupted.append(src)
    lost = sorted(set(expected) - set(seen))
    twice = sorted(rid for rid, n in seen.items() if n > 1)
    FIGURES.count("replay_records_checked", len(expected))
    FIGURES.count("replay_missing", len(lost))
    FIGURES.count("replay_repeated", sum(seen[rid] - 1 for rid in twice))
    FIGURES.count("replay_differing", len(corrupted))
    assert not lost, f"{len(lost)} archived records of {day} missing from {replay_topic}, e.g. {lost[:5]}"
    assert not twice, f"{len(twice)} records replayed more than once, e.g. {twice[:5]}"
    assert not corrupted, f"{len(corrupted)} replayed records differ from the archive, e.g. {corrupted[:5]}"
    return len(expected)


def read_report(client: Any, bucket: str, version: int, day: str) -> tuple[pl.DataFrame, dict[str, int]]:
    """A corrected report and its stats.json, by the contract path."""
    prefix = f"reports/orders/v{version}/dt={day}/"
    report = pl.read_parquet(io.BytesIO(client.get_object(Bucket=bucket, Key=prefix + "report.parquet")["Body"].read()))
    stats = json.loads(client.get_object(Bucket=bucket, Key=prefix + "stats.json")["Body"].read())
    return report, stats


def assert_reports_exact(settings: Settings, client: Any, version: int, days: Iterable[str]) -> None:
    """Each day's corrected report (and its stats) equals the reference computations over the archive."""
    from workers.pipelines import get_pipeline

    pipeline = get_pipeline("orders", version)
    for day in days:
        report, stats = read_report(client, settings.s3_bucket, version, day)
        expected = assert_report_exact(report, archive_frame(client, settings.s3_bucket, settings.events_topic, day),
                                       pipeline)
        assert {k: stats.get(k) for k in expected} == expected, f"stats.json of {day}: {stats} != {expected}"


def assert_live_exact(settings: Settings, client: Any, version: int) -> None:
    """Live results (open windows included: the live tests use an unbounded grace) equal the reference per day."""
    from workers.pipelines import get_pipeline
    from workers.processor.results import live_results

    pipeline = get_pipeline("orders", version)
    for day in archive_days(client, settings.s3_bucket, settings.events_topic):
        live = live_results(client, settings.s3_bucket, "orders", version, day, include_open=True)
        assert_report_exact(live, archive_frame(client, settings.s3_bucket, settings.events_topic, day), pipeline)


def assert_dlq_exact(settings: Settings, client: Any, dlq_topic: str, day: str | None = None) -> int:
    """The DLQ holds each malformed archived record (per the independent rules) with a reason, nothing else.

    DLQ records are identified by their source coordinates (the replay's ``kappa.src.*`` headers, else
    ``kappa.dlq.partition/offset``) and deduplicated, as the processor documents for consumers.
    """
    archive = archive_records(client, settings.s3_bucket, settings.events_topic, day)
    bad = {rid for rid, body in archive.items() if body[1] < 0 or parse_order(body[3]) is None}
    found: dict[RecordId, RecordBody] = {}
    no_reason = []
    for _kind, _stamp, key, value, headers in read_topic(settings, dlq_topic).values():
        src_p = _header(headers, SRC_PARTITION) or _header(headers, DLQ_PARTITION)
        src_o = _header(headers, SRC_OFFSET) or _header(headers, DLQ_OFFSET)
        rid = (int(src_p or -1), int(src_o or -1))
        found[rid] = (0, 0, key, value, ())
        if not (_header(headers, DLQ_REASON) or b"").strip():
            no_reason.append(rid)
    missing = sorted(bad - set(found))
    unexpected = sorted(set(found) - bad)
    altered = [rid for rid in set(found) & bad if found[rid][2:4] != archive[rid][2:4]]
    FIGURES.count("dlq_records_checked", len(found))
    FIGURES.count("dlq_missing", len(missing))
    FIGURES.count("dlq_unexpected", len(unexpected))
    FIGURES.count("dlq_altered", len(altered))
    assert not missing, f"{len(missing)} malformed records not in {dlq_topic}, e.g. {missing[:5]}"
    assert not unexpected, f"{len(unexpected)} valid records sent to {dlq_topic}, e.g. {unexpected[:5]}"
    assert not altered, f"{len(altered)} DLQ records not byte-exact, e.g. {altered[:5]}"
    assert not no_reason, f"{len(no_reason)} DLQ records without a reason header, e.g. {no_reason[:5]}"
    return len(found)
