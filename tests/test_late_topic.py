"""The late topic against the real broker and S3: every record later than grace is produced there
byte-exact with its source coordinates, at least once across SIGKILLs, exactly once after dedup by
(partition, offset), and the distinct count equals the processor's late counter.

The oracle is plain Python over the source topic (per partition in offset order: the window end is at
or before the running max of earlier timestamps minus grace); it shares no code with the engine.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from typing import Any

import dagster as dg
import pytest
from dagster_env import fresh_resources
from test_pipelines import event
from test_processor import Record, bounded, consume_all, produce, wait_for

from workers import keys, late
from workers.config import Settings
from workers.processor.state import list_states

GRACE_MS = 60_000
WINDOW = 60_000
DAY, DAY_MS = "2026-11-20", 1_795_132_800_000  # inside the Dagster partitions


def late_records(n: int, seed: int) -> list[Record]:
    """Events 100 ms apart; ~3 % are stamped 5 minutes back, so far behind the watermark (no malformed
    records: the oracle then need not know the pipeline's validation)."""
    rng = random.Random(seed)
    records: list[Record] = []
    for i in range(n):
        ts = DAY_MS + i * 100
        if i > 3_000 and rng.random() < 0.03:
            ts -= 300_000
        headers = [("source", b"web")] if rng.random() < 0.2 else []
        records.append((f"u{rng.randrange(20)}".encode(), event(i, rng), ts, headers))
    return records


def expected_late(source: list[Any], grace_ms: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(partition, offset) -> (window start, watermark) of every record later than grace."""
    late: dict[tuple[int, int], tuple[int, int]] = {}
    running: dict[int, int] = {}
    for message in source:  # partition/offset order
        partition, ts = message.partition(), message.timestamp()[1]
        window = ts - ts % WINDOW
        if partition in running and window + WINDOW <= running[partition] - grace_ms:
            late[(partition, message.offset())] = (window, running[partition] - grace_ms)
        running[partition] = max(running.get(partition, ts), ts)
    return late


def assert_late_topic(settings: Settings, source_topic: str, late_topic: str, late_counter: int) -> int:
    """Every late record at least once, byte-exact, with true headers; distinct == counter. Returns re-sends."""
    source = consume_all(settings, source_topic)
    by_position = {(m.partition(), m.offset()): m for m in source}
    expected = expected_late(source, GRACE_MS)
    assert expected, "the input has no late record: the test cannot fail"
    seen: dict[tuple[int, int], int] = {}
    for message in consume_all(settings, late_topic):
        headers = message.headers()
        late_headers = {k: v.decode() for k, v in headers if k.startswith("kappa.late.")}
        position = (int(late_headers["kappa.late.partition"]), int(late_headers["kappa.late.offset"]))
        original = by_position[position]
        assert late_headers["kappa.late.topic"] == source_topic
        assert message.key() == original.key() and message.value() == original.value()
        assert message.timestamp()[1] == original.timestamp()[1]
        assert [h for h in headers if not h[0].startswith("kappa.late.")] == (original.headers() or [])
        window, watermark = expected[position]  # KeyError: a record that was not late
        assert int(late_headers["kappa.late.window_start"]) == window
        assert int(late_headers["kappa.late.window_end"]) == window + WINDOW
        assert int(late_headers["kappa.late.watermark"]) == watermark
        assert late_headers["kappa.late.pipeline"] == "orders v1"
        seen[position] = seen.get(position, 0) + 1
    missing = sorted(set(expected) - set(seen))
    assert not missing, f"{len(missing)} late records not on {late_topic}, e.g. {missing[:5]}"
    assert len(seen) == len(expected) == late_counter
    return sum(seen.values()) - len(seen)


def live_command(topic: str, group: str, late_topic: str) -> list[str]:
    return [
        *(sys.executable, "-m", "workers.cli", "processor", "--pipeline", "orders", "--version", "1"),
        *("--topic", topic, "--group", group, "--from-beginning", "--grace-seconds", str(GRACE_MS // 1000)),
        *("--late-topic", late_topic, "--batch-size", "20", "--checkpoint-seconds", "0.2", "--progress", "log"),
    ]


def positions(s3: Any, settings: Settings) -> int:
    """Records the live group has durably processed (sum of checkpointed next offsets)."""
    states = list_states(s3, settings.s3_bucket, keys.live_prefix("orders", 1))
    return sum(s["next_offset"] or 0 for s in states.values())


def run_live_with_kills(settings: Settings, s3: Any, topic: str, late_topic: str, total: int, kills: int) -> int:
    """Kill the live processor mid-stream ``kills`` times, then let it finish and stop it; returns kills landed."""
    command, landed, rng = live_command(topic, "g-late", late_topic), 0, random.Random(kills)
    for round_ in range(kills + 1):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if round_ < kills:
                # past the first late records, and later in each round
                mark = total * (round_ + 1) // (kills + 2)
                wait_for(lambda mark=mark: positions(s3, settings) > mark, timeout=60)
                time.sleep(rng.uniform(0.05, 0.4))  # between checkpoints: sent but uncommitted records
                process.send_signal(signal.SIGKILL)
                process.wait(30)
                done = positions(s3, settings)
                assert done < total, "the kill landed after the last record: make the input larger"
                landed += 1
                continue
            wait_for(lambda: positions(s3, settings) == total, timeout=120)
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, process.stderr.read().decode()[-2000:] if process.stderr else ""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return landed


def live_late_counter(s3: Any, settings: Settings) -> int:
    states = list_states(s3, settings.s3_bucket, keys.live_prefix("orders", 1))
    return sum(day["late"] for s in states.values() for day in s["stats"].values())


def check_live_and_bounded(settings: Settings, s3: Any, topic_factory, n: int, kills: int) -> None:
    records = late_records(n, seed=15)
    topic = topic_factory("events", 3)
    produce(settings, topic, records)
    live_late = keys.late_topic(topic)
    landed = run_live_with_kills(settings, s3, topic, live_late, len(records), kills)
    assert landed == kills
    late_counter = live_late_counter(s3, settings)
    resent = assert_late_topic(settings, topic, live_late, late_counter)
    print(f"live: {kills} SIGKILLs landed mid-stream, {resent} late records re-sent and deduplicated")
    assert_dagster_flags_the_day(late_counter, len(records))

    # bounded, same grace: the replay's own late topic, the same records, counted in the report stats
    bounded_late = keys.late_topic(f"{topic}.replay.r1")
    summary = bounded(settings, 1, topic, "g-late-bounded", grace_ms=GRACE_MS, late_topic=bounded_late)
    stats_late = sum(day["late"] for day in summary.stats.values())
    assert stats_late == summary.late_records
    assert assert_late_topic(settings, topic, bounded_late, stats_late) == 0


def late_share_check(monkeypatch: pytest.MonkeyPatch, share: str | None) -> dg.AssetCheckEvaluation:
    """Run the ``late_share_check`` job (in process, the test's bucket) with that threshold."""
    from kappa_dagster.definitions import defs

    if share is None:
        monkeypatch.delenv(late.RERUN_SHARE_ENV, raising=False)
    else:
        monkeypatch.setenv(late.RERUN_SHARE_ENV, share)
    result = defs.resolve_job_def("late_share_check").execute_in_process(resources=fresh_resources())
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation


def assert_dagster_flags_the_day(late_counter: int, records: int) -> None:
    """The live share (~3 % late) exceeds the default 1 %: a WARN naming the day; 50 % lets it pass."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        flagged = late_share_check(monkeypatch, None)
        assert not flagged.passed and flagged.severity == dg.AssetCheckSeverity.WARN
        assert flagged.metadata["candidate_days"].value == DAY and DAY in (flagged.description or "")
        assert flagged.metadata["max_late_share"].value == pytest.approx(late_counter / records)
        assert f"| {DAY} | orders v1 | {records:,} | {late_counter:,} |" in flagged.metadata["candidates"].value
        assert late_share_check(monkeypatch, "0.5").passed


def test_late_records_reach_the_late_topic_once_after_dedup_across_a_sigkill(
    settings: Settings, s3: Any, topic_factory
) -> None:
    check_live_and_bounded(settings, s3, topic_factory, n=20_000, kills=1)


@pytest.mark.soak
def test_late_topic_across_several_sigkills(settings: Settings, s3: Any, topic_factory) -> None:
    check_live_and_bounded(settings, s3, topic_factory, n=80_000, kills=4)


def test_the_late_topic_and_the_rerun_share_are_configured_with_one_line_errors() -> None:
    from workers.config import load_settings

    env = {"KAPPA_BOOTSTRAP_SERVERS": "h:1", "KAPPA_EVENTS_TOPIC": "orders"}
    assert load_settings(env).late_topic == "orders.late"
    assert load_settings({**env, "KAPPA_LATE_TOPIC": "side.late"}).late_topic == "side.late"
    with pytest.raises(Exception, match="KAPPA_LATE_TOPIC"):
        load_settings({**env, "KAPPA_LATE_TOPIC": "bad topic"})
    assert keys.late_topic("events.replay.r1") == "events.replay.r1.late"
    assert late.rerun_share({}) == 0.01 and late.rerun_share({late.RERUN_SHARE_ENV: "0.2"}) == 0.2
    for bad in ("0", "2", "lots"):
        with pytest.raises(Exception, match=r"KAPPA_LATE_RERUN_SHARE.*must be a number in"):
            late.rerun_share({late.RERUN_SHARE_ENV: bad})
    stats = {"2026-11-19": {"records": 1000, "late": 10}, "2026-11-20": {"records": 100, "late": 2}}
    rows = late.late_by_day(stats, 0.01)
    assert [(r.day, r.share, r.candidate) for r in rows] == [("2026-11-20", 0.02, True), ("2026-11-19", 0.01, False)]
