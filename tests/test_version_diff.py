"""The version diff explains every difference between live v1 and corrected v2, and a logic change is caught.

Set-up on the real stack: generated orders with duplicates, late and malformed records run through a
live v1 processor (60 s grace) until it caught up; the archiver archives them; the day is replayed
with v2 (and with a test-only v8) and gated. The diff of v2 against live v1 leaves exactly zero for
"logic change" in events and amount, and its duplicates and late causes match an independent count
over the consumed records (plain json, no pipeline code). v8 negates refund amounts (its own SQL
definition agrees, so the gate publishes it): the diff shows that under "logic change", and promote
with the default limit refuses it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
import polars as pl
import pytest
from confluent_kafka import Consumer, TopicPartition
from dagster_e2e import publish_replay, run_live_v1_until_caught_up
from dagster_env import dagster_home, fresh_resources  # noqa: F401  (fixture)
from replay_data import day_records

from workers import kafka as kafka_helpers
from workers import promote
from workers.config import Settings
from workers.dashboard import launch
from workers.dev.generator import Faults, produce_events
from workers.errors import KappaError
from workers.pipelines import get_pipeline, register
from workers.pipelines.base import REJECT, FrameT
from workers.pipelines.orders import OrdersV2
from workers.processor import results
from workers.reports import version_diff

DAY = "2026-11-25"
PREVIOUS_DAY = "2026-11-24"  # the events start 10 minutes before midnight: two days to diff
GRACE_MS = 60_000
ORDERS_SQL = Path(__file__).resolve().parents[1] / "workers" / "pipelines" / "orders.sql"
NEGATED_SQL = Path(tempfile.mkdtemp(prefix="kappa-test-sql-")) / "orders_refunds_negated.sql"
# the v8 definition: orders.sql, then its report view redefined with refunds as negative amounts
NEGATED_SQL.write_text(
    ORDERS_SQL.read_text()
    + """
CREATE OR REPLACE TEMP VIEW report AS
SELECT make_timestamp(window_ms * 1000) AS window_start, type, count(*)::BIGINT AS events,
       sum(CASE WHEN type = 'refund' THEN -1 ELSE 1 END * round_even(amount * 1e6, 0)::DECIMAL(38, 0))
         * 0.000001::DECIMAL(7, 6) AS amount
FROM orders_ranked WHERE copy = 1 GROUP BY window_ms, type;
"""
)


@register
class OrdersRefundsNegated(OrdersV2):
    version: ClassVar[int] = 8
    summary: ClassVar[str] = "TEST ONLY: like v2, but refund amounts count negative (a deliberate logic change)"
    reference_sql: ClassVar[str | None] = str(NEGATED_SQL)

    def aggregate(self, rows: FrameT) -> FrameT:
        negated = pl.when(pl.col("type") == "refund").then(-pl.col("amount")).otherwise(pl.col("amount"))
        return super().aggregate(rows.with_columns(negated.alias("amount")))




def consumed(settings: Settings) -> pl.DataFrame:
    """Every record of the topic as (partition, offset, timestamp, parsed fields), read back from Kafka."""
    end = kafka_helpers.end_offsets(settings, settings.events_topic)
    consumer = Consumer(settings.kafka_config(**{"group.id": "version-diff-check", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(settings.events_topic, p, 0) for p in end])
    rows, left = [], sum(end.values())
    while left:
        message = consumer.poll(5)
        assert message is not None, "records missing from the topic"
        rows.append((message.partition(), message.offset(), message.timestamp()[1], _fields(message.value())))
        left -= 1
    consumer.close()
    return pl.DataFrame(
        {
            "partition": [r[0] for r in rows],
            "offset": [r[1] for r in rows],
            "ts": [r[2] for r in rows],
            "event_id": [r[3][0] if r[3] else None for r in rows],
        }
    ).sort("partition", "offset")


def _fields(value: bytes | None) -> tuple[str, str, float] | None:
    """The orders validity rules, restated (the generator's malformed sorts are all caught here)."""
    try:
        body = json.loads(value or b"")
    except ValueError:
        return None
    types = {"page_view", "add_to_cart", "purchase", "refund"}
    if not isinstance(body, dict) or not isinstance(body.get("event_id"), str):
        return None
    if not isinstance(body.get("user_id"), str) or body.get("type") not in types:
        return None
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return None
    return body["event_id"], body["type"], float(amount)


def independent_causes(records: pl.DataFrame) -> dict[str, int]:
    """Records live v1 dropped as late (window closed before they arrived) that v2 counts, and records
    live v1 counted that v2 drops as repeated event_ids (same partition and window)."""
    valid = records.filter(pl.col("event_id").is_not_null()).with_columns((pl.col("ts") // 60_000).alias("w"))
    seen_max = pl.col("ts").cum_max().shift(1).over("partition")
    valid = valid.with_columns((((pl.col("w") + 1) * 60_000) <= seen_max - GRACE_MS).fill_null(False).alias("late"))
    first = valid.with_columns(pl.struct("partition", "w", "event_id").is_first_distinct().alias("first"))
    late = first.filter(pl.col("late") & pl.col("first")).height
    duplicates = first.filter(~pl.col("late") & ~pl.col("first")).height
    return {"late": late, "duplicates": duplicates}


def day_of(records: pl.DataFrame) -> pl.DataFrame:
    start = int(pl.Series([DAY]).str.to_datetime(time_zone="UTC").dt.epoch("ms")[0])
    return records.filter((pl.col("ts") >= start) & (pl.col("ts") < start + 86_400_000))


@pytest.fixture
def live_and_archived(settings: Settings, s3: Any) -> pl.DataFrame:
    faults = Faults(duplicates=0.08, late=0.06, malformed=0.05)
    produce_events(settings, 1500, start=f"{PREVIOUS_DAY}T23:50:00+00:00", days=30 / 1440, partitions=2, seed=9,
                   faults=faults)
    run_live_v1_until_caught_up(settings, s3, GRACE_MS)
    archiver = [sys.executable, "-m", "workers.cli", "archiver", "--until-end", "--group", "kappa.archiver.vdiff"]
    subprocess.run(archiver, check=True, capture_output=True, timeout=120)
    return consumed(settings)


def test_diff_of_live_v1_and_corrected_v2_is_fully_explained(
    settings: Settings,
    s3: Any,
    live_and_archived: pl.DataFrame,
    dagster_home: Path,  # noqa: F811
) -> None:
    from kappa_dagster.defs.assets.version_diff import version_diff_asset

    publish_replay(settings, s3, 2, DAY)
    diff = version_diff.compute(s3, settings.s3_bucket, settings.events_topic, "orders", 2, DAY)

    assert diff.baseline == "live v1"
    assert diff.totals[version_diff.LOGIC] == {"groups": 0, "events": 0, "amount": 0.0}
    assert diff.unexplained == 0
    expected = independent_causes(day_of(live_and_archived))
    assert expected["late"] > 0 and expected["duplicates"] > 0  # the faults landed
    assert diff.totals["late"]["events"] == expected["late"]  # v2 puts back what live v1 dropped
    assert diff.totals["duplicates"]["events"] == -expected["duplicates"]
    assert diff.totals["malformed"]["groups"] == 0  # v1 and v2 parse alike
    # the causes add up to the whole difference, exactly (amounts compared in millionths)
    live_v1 = results.live_results(s3, settings.s3_bucket, "orders", 1, DAY, include_open=True)
    live = version_diff.exact(live_v1, ["events", "amount"])
    report = results.corrected_report(s3, settings.s3_bucket, "orders", 2, DAY)
    assert report is not None
    corrected = version_diff.exact(report.frame, ["events", "amount"])
    assert int(diff.frame["events"].sum()) == int(corrected["events"].sum()) - int(live["events"].sum())
    assert int(diff.frame["amount"].sum()) == int(corrected["amount"].sum()) - int(live["amount"].sum())

    with dg.instance_for_test() as instance:  # the Dagster asset writes diff.parquet and shows the numbers
        result = dg.materialize([version_diff_asset], partition_key=DAY, instance=instance, resources=fresh_resources())
    metadata = result.asset_materializations_for_node("version_diff")[0].metadata
    assert metadata["path"].value == f"s3://{settings.s3_bucket}/reports/orders/v2/dt={DAY}/diff.parquet"
    assert metadata["logic_change_groups"].value == 0 and metadata["late_events"].value == expected["late"]
    assert "| late |" in metadata["by_cause"].value
    stored = version_diff.read(s3, settings.s3_bucket, "orders", 2, DAY)
    assert stored is not None and set(stored["cause"]) == {"late", "duplicates"}
    assert stored["events"].sum() == diff.frame["events"].sum()

    assert_range_run_diffs_each_day(settings, s3, stored)

    pointer = promote.promote(s3, settings.s3_bucket, settings.events_topic, "orders", 2)
    assert pointer["diffs"][DAY].startswith(f"{DAY}: v2 vs live v1: duplicates")
    # once promoted, users read v2 for the day: nothing differs any more
    again = version_diff.compute(s3, settings.s3_bucket, settings.events_topic, "orders", 2, DAY,
                                 late_source=version_diff.late_topic_source(settings))  # v2's live part: shuffled
    assert again.baseline.startswith("promoted v2") and again.frame.is_empty()


def assert_range_run_diffs_each_day(settings: Settings, s3: Any, day_diff: pl.DataFrame) -> None:
    """A backfill of version_diff over two days is one run (single-run policy) that writes each day's
    diff and numbers, the same as a run of that day alone."""
    from kappa_dagster.defs.assets.version_diff import version_diff_asset

    publish_replay(settings, s3, 2, PREVIOUS_DAY)
    tags = {"dagster/asset_partition_range_start": PREVIOUS_DAY, "dagster/asset_partition_range_end": DAY}
    with dg.instance_for_test() as instance:
        result = dg.materialize([version_diff_asset], tags=tags, instance=instance, resources=fresh_resources())
        assert result.success and len(instance.get_runs()) == 1
        found = {m.partition: m.metadata for m in result.asset_materializations_for_node("version_diff")}
    assert set(found) == {PREVIOUS_DAY, DAY}
    for day, metadata in found.items():
        assert metadata["path"].value == f"s3://{settings.s3_bucket}/reports/orders/v2/dt={day}/diff.parquet"
        assert metadata["unexplained_groups"].value == 0
    previous = version_diff.read(s3, settings.s3_bucket, "orders", 2, PREVIOUS_DAY)
    assert previous is not None and previous["events"].abs().sum() > 0  # the day before midnight differs too
    again = version_diff.read(s3, settings.s3_bucket, "orders", 2, DAY)
    assert again is not None and again.sort(again.columns).equals(day_diff.sort(day_diff.columns))


def test_a_logic_change_is_unexplained_and_refused(
    settings: Settings,
    s3: Any,
    live_and_archived: pl.DataFrame,
    dagster_home: Path,  # noqa: F811
) -> None:
    from kappa_dagster import defs

    publish_replay(settings, s3, 8, DAY)
    diff = version_diff.compute(s3, settings.s3_bucket, settings.events_topic, "orders", 8, DAY)

    logic = diff.frame.filter(pl.col("cause") == version_diff.LOGIC)
    assert diff.unexplained == logic.height > 0
    assert set(logic["type"]) == {"refund"} and logic["events"].to_list() == [0] * logic.height
    assert (logic["amount"] < 0).all()  # refunds now subtract
    assert diff.totals["late"]["events"] > 0 and diff.totals["duplicates"]["events"] < 0  # still explained

    with pytest.raises(KappaError, match=r"not promoted: \d+ \(window, group\) rows differ for no known cause"):
        promote.promote(s3, settings.s3_bucket, settings.events_topic, "orders", 8)
    assert promote.read_current(s3, settings.s3_bucket, "orders") is None
    with dg.instance_for_test() as instance:  # the Dagster promote job refuses it the same way
        config = {"ops": {"promote_version": {"config": {"pipeline": "orders", "version": 8}}}}
        job = defs.resolve_job_def("promote").execute_in_process(
            run_config=config, instance=instance, resources=fresh_resources(), raise_on_error=False
        )
        failure = next(e for e in job.all_events if e.is_step_failure)
    assert not job.success and "differ for no known cause" in str(failure.step_failure_data.error.message)
    assert promote.read_current(s3, settings.s3_bucket, "orders") is None
    pointer = promote.promote(s3, settings.s3_bucket, settings.events_topic, "orders", 8, max_unexplained=10**6)
    assert pointer["version"] == 8


@pytest.mark.skipif(not launch.CHROMIUM.exists(), reason="needs Debian's chromium (make browser)")
def test_dashboard_panel_shows_the_diff_by_cause(
    settings: Settings, s3: Any, live_and_archived: pl.DataFrame, tmp_path: Path
) -> None:
    publish_replay(settings, s3, 2, DAY)
    diff = version_diff.compute(s3, settings.s3_bucket, settings.events_topic, "orders", 2, DAY)
    version_diff.write(s3, settings.s3_bucket, diff)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard, url = launch.spawn(port, interval=1, log=tmp_path / "dashboard.log")
    try:
        launch.wait_ready(url, dashboard)
        with launch.browser_page() as page:
            page.goto(f"{url}/?pipeline=orders&version=2&diff_day={DAY}")
            launch.wait_rendered(page)
            page.wait_for_selector("#causes-table tbody tr td.num", timeout=30_000)
            rows = page.locator("#causes-table tbody tr").all_inner_texts()
            shown = {row.split("\t")[0]: row for row in rows}
            assert set(shown) == {"duplicates", "late"}, rows
            late = number(shown["late"].split("\t")[2])
            assert late == diff.totals["late"]["events"] > 0
            assert "every difference is explained" in page.inner_text("#causes-summary")
            assert page.inner_text("#errors") == ""
    finally:
        dashboard.terminate()
        dashboard.wait(10)


def number(text: str) -> int:
    return int(text.replace(",", "").replace("+", "").replace("\u2212", "-"))


@register
class OrdersStrictAmounts(OrdersV2):
    version: ClassVar[int] = 9
    summary: ClassVar[str] = "TEST ONLY: like v2, but amounts above 90 are malformed"

    def parse(self, values: Sequence[bytes | None]) -> pl.DataFrame:
        rows = super().parse(values)
        too_big = pl.col(REJECT).is_null() & (pl.col("amount") > 90)
        reason = pl.when(too_big).then(pl.lit("amount above 90")).otherwise(pl.col(REJECT))
        return rows.with_columns(reason.alias(REJECT))


def test_records_malformed_under_one_version_only_are_their_own_cause() -> None:
    archive = day_records(DAY, 3_000, partitions=3, seed=4)
    v2, v9 = get_pipeline("orders", 2), get_pipeline("orders", 9)
    baseline = version_diff.Baseline("replay v2", v2.batch_report(archive)[0], v2.diff_rules(archive, None))
    frame = version_diff.attribute(v2.key_columns, ["events", "amount"], baseline, v9.batch_report(archive)[0],
                                   v9.diff_rules(archive, None))
    totals = version_diff.totals(frame, ["events", "amount"], {"amount"})

    # independently: the distinct valid records with an amount above 90, first copy per (partition, minute, event_id)
    records = archive.unique(["partition", "offset"]).sort("partition", "offset")
    fields = [_fields(v) for v in records["value"].to_list()]
    big = records.select(
        "partition",
        (pl.col("timestamp").dt.epoch("ms") // 60_000).alias("w"),
        pl.Series("event_id", [f[0] if f else None for f in fields], dtype=pl.String),
        pl.Series("amount", [f[2] if f else None for f in fields], dtype=pl.Float64),
    ).filter(pl.col("event_id").is_not_null())
    big = big.unique(["partition", "w", "event_id"], keep="first", maintain_order=True).filter(pl.col("amount") > 90)
    assert big.height > 0  # the stricter rule bites
    assert totals["malformed"]["events"] == -big.height
    assert totals["logic change"] == {"groups": 0, "events": 0, "amount": 0.0}
    assert set(frame["cause"]) == {"malformed"}
