"""Replay status logic without a stack: states, rates and ETA formatting."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from confluent_kafka import KafkaException

from workers.config import load_settings
from workers.lag import GroupLag, LagReader
from workers.replay.manifest import ReplayManifest
from workers.replay.status import RateTracker, format_eta, replay_row, replay_state

MANIFEST = ReplayManifest(
    replay_id="orders-v2-20261120-abcdef",
    pipeline="orders",
    version=2,
    day="2026-11-20",
    group="kappa.orders.v2.replay.orders-v2-20261120-abcdef",
    replay_topic="events.replay.orders-v2-20261120-abcdef",
    source_topic="events",
    status="loaded",
    records=1000,
    end_offsets={"0": 600, "1": 400},
)


def lag(committed: dict[int, int | None]) -> GroupLag:
    return GroupLag(MANIFEST.group, MANIFEST.replay_topic, {0: 600, 1: 400}, committed)


@pytest.mark.parametrize(
    ("status", "committed", "report", "expected"),
    [
        ("loading", {0: None, 1: None}, False, "loading"),
        ("loaded", {0: None, 1: None}, False, "waiting"),
        ("loaded", {0: 300, 1: None}, False, "consuming"),
        ("loaded", {0: 600, 1: 400}, False, "caught up"),
        ("loaded", {0: 600, 1: 400}, True, "caught up"),  # a report file of an earlier load proves nothing
        ("consumed", {0: 600, 1: 400}, True, "checking"),
        ("rejected", {0: 600, 1: 400}, True, "checks failed"),
        ("reported", {0: 600, 1: 400}, True, "reported"),
        ("reported", None, True, "done"),
        ("loaded", None, False, "topic missing"),
    ],
)
def test_replay_state(status: str, committed: dict | None, report: bool, expected: str) -> None:
    group = None if committed is None else lag(committed)
    assert replay_state(replace(MANIFEST, status=status), group, report) == expected


def test_rate_and_eta_come_from_two_observations() -> None:
    rates = RateTracker()
    assert rates.observe("r", 0, now=100.0) is None
    assert rates.observe("r", 500, now=110.0) == 50.0


def test_replay_row_progress_and_eta() -> None:
    rates = RateTracker()
    rates.observe(MANIFEST.replay_id, 0, now=time.monotonic() - 10)  # nothing done 10 s ago
    row = replay_row(MANIFEST, lag({0: 300, 1: 200}), False, rates)
    assert (row.total, row.consumed, row.lag, row.state) == (1000, 500, 500, "consuming")
    assert row.percent == 50.0 and row.rate == pytest.approx(50, rel=0.05)
    assert row.eta_s == pytest.approx(500 / row.rate)


def test_finished_replay_is_complete_even_without_its_topic() -> None:
    row = replay_row(replace(MANIFEST, status="reported"), None, True, RateTracker())
    assert (row.consumed, row.lag, row.percent, row.eta_s, row.state) == (1000, 0, 100.0, 0.0, "done")


@pytest.mark.parametrize(("seconds", "text"), [(None, "?"), (0, "0s"), (59.6, "1m00s"), (95, "1m35s"), (7380, "2h03m")])
def test_format_eta(seconds: float | None, text: str) -> None:
    assert format_eta(seconds) == text


def test_committed_offsets_kafka_does_not_give_raise_instead_of_reading_as_never_committed() -> None:
    """A replay's progress must not drop to 0 % because an offsets request failed: the error is raised
    (the sensor skips that tick, the CLI prints it) once its retries ran out. Here no broker listens."""
    reader = LagReader(load_settings({"KAPPA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}), timeout=2)
    started = time.monotonic()
    with pytest.raises(KafkaException):
        reader.committed(MANIFEST.group, MANIFEST.replay_topic, [0, 1])
    assert time.monotonic() - started < 10
