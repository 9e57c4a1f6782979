"""Pipeline logic without Kafka or S3: parsing, registry, batch reference, engine folding."""

from __future__ import annotations

import json
import random

import polars as pl
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from workers.archive import format as archive_format
from workers.errors import KappaError
from workers.pipelines import get_pipeline, known
from workers.pipelines.base import REJECT
from workers.pipelines.orders import OrdersV1, parse_orders
from workers.processor.engine import apply, split_batch
from workers.processor.state import PartitionState

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
GOOD = {"event_id": "e1", "user_id": "u1", "type": "purchase", "amount": 12.5}
GOOD_JSON = json.dumps(GOOD).encode()

MALFORMED = {
    "not_json": b"hello",
    "invalid_utf8": b'{"event_id":"\xff","user_id":"u","type":"purchase","amount":1}',
    "missing_field": json.dumps({k: v for k, v in GOOD.items() if k != "user_id"}).encode(),
    "id_not_string": json.dumps({**GOOD, "event_id": 5}).encode(),
    "amount_string": json.dumps({**GOOD, "amount": "12"}).encode(),
    "amount_bool": json.dumps({**GOOD, "amount": True}).encode(),
    "amount_null": json.dumps({**GOOD, "amount": None}).encode(),
    "unknown_type": json.dumps({**GOOD, "type": "teleport"}).encode(),
    "not_object": b"[1, 2]",
    "json_null": b"null",
    "nan": b'{"event_id":"e","user_id":"u","type":"purchase","amount":NaN}',
    "infinity": b'{"event_id":"e","user_id":"u","type":"purchase","amount":Infinity}',
    "overflow": b'{"event_id":"e","user_id":"u","type":"purchase","amount":1e400}',
    "huge": b'{"event_id":"e","user_id":"u","type":"purchase","amount":1e16}',
    "empty": b"",
    "blank": b"   ",
    "tombstone": None,
    "two_objects": GOOD_JSON + b"\n" + GOOD_JSON,
    "two_objects_one_line": GOOD_JSON + b" " + GOOD_JSON,
    "blank_line": b"\r\n",
}


def event(i: int, rng: random.Random, **override: object) -> bytes:
    body = {
        "event_id": f"e{i}",
        "user_id": f"u{rng.randrange(5)}",
        "type": rng.choice(["page_view", "add_to_cart", "purchase", "refund"]),
        "amount": round(rng.uniform(0, 300), 2),
    }
    return json.dumps({**body, **override}).encode()


def archive(values: list[bytes | None], timestamps: list[int], partitions: list[int] | None = None) -> pl.DataFrame:
    """Raw archive rows (the archive contract) for the batch reference."""
    n = len(values)
    partitions = partitions or [0] * n
    offsets, seen = [], {}
    for p in partitions:
        offsets.append(seen.get(p, 0))
        seen[p] = offsets[-1] + 1
    return archive_format.frame_from_columns(
        {
            "topic": ["t"] * n,
            "partition": partitions,
            "offset": offsets,
            "timestamp": timestamps,
            "timestamp_type": [1] * n,
            "key": [None] * n,
            "value": values,
            "headers": [[] for _ in range(n)],
        }
    )


def plain_report(values: list[bytes | None], timestamps: list[int], partitions: list[int], dedup: bool) -> pl.DataFrame:
    """The expected report, computed the obvious way with json + polars (no pipeline code).

    Dedup (v2) keeps one copy per (window, event_id) across partitions; callers pass exact copies."""
    rows, seen = [], set()
    for value, ts, _partition in zip(values, timestamps, partitions, strict=True):
        body = json.loads(value)  # test data: malformed values are never passed here
        window = ts // 60_000 * 60_000
        if dedup and (window, body["event_id"]) in seen:
            continue
        seen.add((window, body["event_id"]))
        rows.append({"window_start": window, "type": body["type"], "amount": float(body["amount"])})
    return (
        pl.DataFrame(rows)
        .group_by("window_start", "type")
        .agg(pl.len().cast(pl.Int64).alias("events"), pl.col("amount").sum())
        .with_columns(pl.col("window_start").cast(pl.Datetime("ms", "UTC")))
        .select("window_start", "type", "events", "amount")
        .sort("window_start", "type")
    )


def assert_reports_match(actual: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Exact keys and counts; amounts to the micro-unit (the plain computation adds floats)."""
    assert actual.select("window_start", "type", "events").equals(expected.select("window_start", "type", "events"))
    assert (actual["amount"] - expected["amount"]).abs().max() < 1e-6


# -------------------------------------------------------------------- registry


def test_registry_knows_orders_versions() -> None:
    assert {("orders", 1), ("orders", 2)} <= set(known())
    assert get_pipeline("orders", 2).dedup_by == ("event_id",)


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [("nope", 1, "unknown pipeline 'nope'"), ("orders", 99, "pipeline 'orders' has no version 99")],
)
def test_registry_errors_list_known_pipelines(name: str, version: int, message: str) -> None:
    with pytest.raises(KappaError, match=message) as info:
        get_pipeline(name, version)
    assert "orders v1, orders v2" in str(info.value)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------- parsing


@pytest.mark.parametrize("sort", sorted(MALFORMED))
def test_every_malformed_value_is_rejected_with_a_reason(sort: str) -> None:
    parsed = parse_orders([GOOD_JSON, MALFORMED[sort], GOOD_JSON])
    assert parsed[REJECT].to_list()[0] is None and parsed[REJECT].to_list()[2] is None
    assert parsed[REJECT][1], f"{sort} was accepted"
    assert parsed.row(0) == parsed.row(2) == ("e1", "u1", "purchase", 12.5, None)


def test_fast_and_slow_paths_agree() -> None:
    rng = random.Random(3)
    values = [event(i, rng) for i in range(200)]
    fast = parse_orders(values)
    slow = parse_orders([*values, b"bad"]).head(200)
    assert fast.equals(slow)
    assert fast[REJECT].null_count() == 200


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param([GOOD_JSON + b" " + GOOD_JSON, b" "], id="two_documents_next_to_a_blank_value"),
        pytest.param([GOOD_JSON + b"\t" + GOOD_JSON, b"\r\n"], id="two_documents_next_to_a_newline_value"),
        pytest.param([GOOD_JSON + b' {"event_id":"e2","user_id":"u","type":"refund","amount":', b"2.5}"],
                     id="a_document_split_across_two_values"),
        pytest.param([b'{"event_id":"e3",', b'"user_id":"u","type":"refund","amount":1}'], id="split_at_a_comma"),
    ],
)
def test_a_batch_is_judged_value_by_value(batch: list[bytes]) -> None:
    """Values that are malformed alone stay malformed when their concatenation is valid JSON lines."""
    parsed = parse_orders([GOOD_JSON, *batch, GOOD_JSON])
    assert parsed[REJECT].to_list()[0] is None and parsed[REJECT].to_list()[-1] is None
    assert parsed[REJECT].slice(1, len(batch)).null_count() == 0, parsed


def test_batch_parse_equals_value_by_value_parse() -> None:
    """Any mix of good and malformed values: the batch's rows are the rows each value gets alone."""
    rng = random.Random(11)
    pool = [event(i, rng) for i in range(20)] + list(MALFORMED.values()) + [b" ", b"\n", GOOD_JSON + b" " + GOOD_JSON]
    pool += [GOOD_JSON[:17], GOOD_JSON[17:], GOOD_JSON + b" " + GOOD_JSON[:17]]  # one document in pieces
    for _ in range(300):
        values = [rng.choice(pool) for _ in range(rng.randrange(1, 12))]
        alone = pl.concat([parse_orders([value]) for value in values])
        assert parse_orders(values).equals(alone), values


def test_extra_fields_and_integer_amounts_are_fine() -> None:
    parsed = parse_orders([json.dumps({**GOOD, "amount": 3, "extra": [1, {"x": None}]}).encode()])
    assert parsed.row(0) == ("e1", "u1", "purchase", 3.0, None)


# -------------------------------------------------------------------- batch reference


def dataset(n: int, seed: int, partitions: int = 1) -> tuple[list[bytes | None], list[int], list[int]]:
    """Valid events with ~10% exact re-sends (same partition, same timestamp) and some malformed values."""
    rng = random.Random(seed)
    values, timestamps, parts = [], [], []
    for i in range(n):
        value, ts, part = event(i, rng), BASE_MS + i * 997, rng.randrange(partitions)
        copies = 2 if rng.random() < 0.1 else 1
        for _ in range(copies):
            values.append(value)
            timestamps.append(ts)
            parts.append(part)
        if rng.random() < 0.05:
            values.append(rng.choice(list(MALFORMED.values())))
            timestamps.append(ts)
            parts.append(part)
    return values, timestamps, parts


@pytest.mark.parametrize("version", [1, 2])
def test_batch_report_equals_plain_computation(version: int) -> None:
    values, timestamps, parts = dataset(600, seed=version, partitions=3)
    report, stats = get_pipeline("orders", version).batch_report(archive(values, timestamps, parts))
    good = [(v, t, p) for v, t, p in zip(values, timestamps, parts, strict=True) if v not in MALFORMED.values()]
    expected = plain_report(*map(list, zip(*good, strict=True)), dedup=version == 2)  # type: ignore[arg-type]
    assert_reports_match(report, expected)
    assert report.schema == get_pipeline("orders", version).output_schema
    assert stats["records"] == len(values)
    assert stats["counted"] + stats["dlq"] + stats["duplicates"] + stats["late"] == stats["records"]
    assert stats["dlq"] == len(values) - len(good)
    assert (stats["duplicates"] > 0) == (version == 2)
    assert report["events"].sum() == stats["counted"]


def test_batch_report_drops_duplicate_archive_rows() -> None:
    values, timestamps, parts = dataset(100, seed=9)
    frame = archive(values, timestamps, parts)
    report, stats = get_pipeline("orders", 1).batch_report(pl.concat([frame, frame.head(30)]))
    assert report.equals(get_pipeline("orders", 1).batch_report(frame)[0])
    assert stats["records"] == len(values)


# -------------------------------------------------------------------- engine folding (no Kafka)


def consumed(partition: int, offset: int, timestamp: int, value: bytes | None) -> Message:
    """A record as ``consume()`` returns it (``split_batch`` reads the client's own message type)."""
    return Message(topic="t", partition=partition, offset=offset, timestamp=(TIMESTAMP_CREATE_TIME, timestamp),
                   value=value)


def fold(version: int, values: list, timestamps: list[int], batch: int, grace_ms: int | None) -> PartitionState:
    pipeline = get_pipeline("orders", version)
    state = PartitionState(pipeline, "t", "g", 0, grace_ms)
    messages = [consumed(0, i, t, v) for i, (v, t) in enumerate(zip(values, timestamps, strict=True))]
    for start in range(0, len(messages), batch):
        apply(split_batch(messages[start : start + batch], pipeline).frame, state)
    state.close_windows(2**62)
    return state


@pytest.mark.parametrize("version", [1, 2])
def test_engine_folding_is_batch_size_independent_and_equals_reference(version: int) -> None:
    values, timestamps, _ = dataset(500, seed=5)
    pipeline = get_pipeline("orders", version)
    expected, stats = pipeline.batch_report(archive(values, timestamps))
    for batch in (1, 7, 64, 10_000):
        state = fold(version, values, timestamps, batch, grace_ms=None)
        assert pipeline.finalize(state.pending).equals(expected), batch
        assert {k: state.stats[d][k] for d in state.stats for k in stats} == stats


def test_event_time_ordered_input_with_grace_0_keeps_bounded_state_and_the_same_report() -> None:
    """What a replay topic is (event-time order per partition) with the grace replay_consume passes:
    nothing is late, the report equals the reference, and open windows and dedup keys stay about one
    window's worth whatever the history (issue 4: memory must not grow with history)."""
    rng = random.Random(3)
    n = 3000
    values = [event(i, rng) for i in range(n)]
    values += values[::10]  # exact re-sends, inserted in time order below
    timestamps = [BASE_MS + i * 1_000 for i in range(n)] + [BASE_MS + i * 1_000 for i in range(0, n, 10)]
    order = sorted(range(len(values)), key=lambda i: timestamps[i])
    values, timestamps = [values[i] for i in order], [timestamps[i] for i in order]
    pipeline = get_pipeline("orders", 2)
    expected, stats = pipeline.batch_report(archive(values, timestamps))
    for batch in (1, 97, 10_000):
        state = PartitionState(pipeline, "t", "g", 0, 0)
        messages = [consumed(0, i, t, v) for i, (v, t) in enumerate(zip(values, timestamps, strict=True))]
        peak_open = peak_seen = 0
        for start in range(0, len(messages), batch):
            apply(split_batch(messages[start : start + batch], pipeline).frame, state)
            peak_open, peak_seen = max(peak_open, state.open.height), max(peak_seen, state.seen.height)
        state.close_windows(2**62)
        assert pipeline.finalize(state.pending).equals(expected), batch
        assert {k: state.stats[d][k] for d in state.stats for k in stats} == stats
        assert sum(c["late"] for c in state.stats.values()) == 0
        # 60 records per 1-minute window: state never holds more than the window in progress (+ one batch)
        assert peak_open <= 2 * len(pipeline.partial_schema) and peak_seen <= 66 + batch, (batch, peak_open, peak_seen)


def test_late_records_are_counted_and_never_mixed_in() -> None:
    """A record for a window that closed (watermark = max ts - grace) is late, whatever the batching."""
    rng = random.Random(1)
    values = [event(i, rng, type="purchase", amount=1) for i in range(5)]
    # seconds: 0 opens [0,60); 200 moves the watermark to 170 and closes it; 10 and 100 are then late;
    # 170 is not (its window [120,180) ends after the watermark)
    timestamps = [BASE_MS + s * 1000 for s in (0, 200, 10, 170, 100)]
    for batch in (1, 2, 5):
        state = fold(1, values, timestamps, batch, grace_ms=30_000)
        report = get_pipeline("orders", 1).finalize(state.pending)
        assert report["events"].to_list() == [1, 1, 1]
        assert report["window_start"].dt.epoch("ms").to_list() == [BASE_MS + s * 1000 for s in (0, 120, 180)]
        assert sum(c["late"] for c in state.stats.values()) == 2


@pytest.mark.parametrize("window_ms", [7 * 60_000, 0, -60_000, 86_400_000 * 2, 90_000.0])
def test_a_window_that_does_not_divide_a_day_fails_fast_with_one_line(window_ms: object) -> None:
    """A 7-minute window straddles midnight: its records would belong to two day reports."""
    from workers.pipelines import register
    from workers.pipelines.orders import OrdersV2

    odd = type("OddWindow", (OrdersV2,), {"name": "odd_window", "version": 1, "window_ms": window_ms})
    with pytest.raises(KappaError, match="does not divide a day") as error:
        register(odd)
    assert "\n" not in str(error.value)
    assert ("odd_window", 1) not in known()


@pytest.mark.parametrize("window_ms", [1000, 60_000, 300_000, 3_600_000, 86_400_000])
def test_windows_that_tile_a_day_are_accepted(window_ms: int) -> None:
    from workers.pipelines import _REGISTRY, register
    from workers.pipelines.orders import OrdersV2

    fine = type("FineWindow", (OrdersV2,), {"name": "fine_window", "version": window_ms, "window_ms": window_ms})
    try:
        assert register(fine) is fine
        assert get_pipeline("fine_window", window_ms).window_ms == window_ms
    finally:
        _REGISTRY.pop(("fine_window", window_ms), None)


def test_v2_counts_copies_across_partitions_by_the_smallest_timestamp_partition_offset() -> None:
    """Copies of one event_id in other partitions count once; the one that counts has the smallest
    (timestamp, partition, offset), whatever order the archive rows come in."""
    copies = [
        (json.dumps({**GOOD, "type": "refund", "amount": 1}).encode(), BASE_MS + 5, 2),
        (json.dumps({**GOOD, "type": "purchase", "amount": 2}).encode(), BASE_MS + 5, 0),
        (json.dumps({**GOOD, "type": "add_to_cart", "amount": 3}).encode(), BASE_MS + 1, 1),
    ]
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        values, timestamps, parts = zip(*(copies[i] for i in order), strict=True)
        report, stats = get_pipeline("orders", 2).batch_report(archive(list(values), list(timestamps), list(parts)))
        assert report.select("type", "events", "amount").rows() == [("add_to_cart", 1, 3.0)]
        assert (stats["counted"], stats["duplicates"]) == (1, 2)
    report, _ = get_pipeline("orders", 1).batch_report(archive(*map(list, zip(*copies, strict=True))))  # type: ignore[arg-type]
    assert report["events"].sum() == 3


def test_a_pipeline_whose_aggregate_needs_an_eager_frame_fails_with_what_to_change() -> None:
    """The engine folds on lazy plans: an ``aggregate`` that reads ``.height`` is named in one line."""

    class EagerOnly(OrdersV1):
        def aggregate(self, rows):  # type: ignore[no-untyped-def]
            assert rows.height >= 0
            return super().aggregate(rows)

    values, timestamps, _ = dataset(50, seed=3)
    pipeline = EagerOnly()
    state = PartitionState(pipeline, "t", "g", 0, None)
    frame = split_batch([consumed(0, i, t, v) for i, (v, t) in enumerate(zip(values, timestamps, strict=True))],
                        pipeline).frame
    expected = r"orders v1: aggregate\(\) and merge\(\) must accept a polars LazyFrame.*height"
    with pytest.raises(KappaError, match=expected):
        apply(frame, state)
