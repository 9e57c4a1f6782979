"""Many days as one replay without Dagster: `kappa replay load --last-day` and `kappa replay consume
--consumers N`, reuse of a range load, and a range topic kept while one of its days still reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from dagster_e2e import archive
from dagster_env import ROOT
from polars.testing import assert_frame_equal
from replay_data import orders_report, write_days

from workers import kafka as kafka_helpers
from workers import keys
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.errors import KappaError
from workers.processor.results import corrected_report
from workers.replay import lease as replay_lease
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest

DAYS = ["2026-11-20", "2026-11-21"]


def kappa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=240)


def manifest_of(s3: Any, settings: Settings, day: str) -> replay_manifest.ReplayManifest:
    slot = replay_manifest.replay_id("orders", 2, day, settings.s3_bucket, settings.events_topic)
    found = replay_manifest.read_manifest(s3, settings.s3_bucket, slot)
    assert found is not None
    return found


def test_cli_loads_a_range_into_one_topic_and_two_members_consume_it(settings: Settings, s3: Any) -> None:
    write_days(s3, settings.s3_bucket, settings.events_topic, DAYS, 2000)
    loaded = kappa("replay", "load", "--day", DAYS[0], "--last-day", DAYS[1], "--version", "2")
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    first, second = (manifest_of(s3, settings, day) for day in DAYS)
    assert first.replay_topic == second.replay_topic and first.group == second.group
    assert first.range_days == second.range_days == DAYS and first.status == second.status == "loaded"
    assert json.loads(loaded.stdout.strip().splitlines()[-1])["topic"] == first.replay_topic
    end = kafka_helpers.topic_end_offsets(settings, first.replay_topic) or {}
    assert sum(end.values()) == (first.records or 0) + (second.records or 0)  # both days, once each

    consumed = kappa("replay", "consume", "--day", DAYS[0], "--last-day", DAYS[1], "--consumers", "2")
    assert consumed.returncode == 0, consumed.stdout + consumed.stderr
    for day in DAYS:
        found = corrected_report(s3, settings.s3_bucket, "orders", 2, day)
        assert found is not None, day
        expected = orders_report(archive(s3, settings, day), version=2)
        assert_frame_equal(found.frame, expected, check_exact=False, rel_tol=1e-12)

    again = kappa("replay", "load", "--day", DAYS[0], "--last-day", DAYS[1], "--version", "2")
    assert again.returncode == 0 and again.stdout.count("already holds this exact archive") == 2, again.stdout


def test_reloading_one_day_keeps_the_range_topic_its_other_day_still_reads(settings: Settings, s3: Any) -> None:
    write_days(s3, settings.s3_bucket, settings.events_topic, DAYS, 300)
    spec = replay_loader.ReplaySpec("orders", 2, DAYS[0], settings.events_topic, settings.s3_bucket, run="r1")
    results = replay_loader.load_range(settings, replay_loader.RangeSpec.of(spec, DAYS), client=s3)
    shared = results[DAYS[0]].manifest.replay_topic

    alone = replay_loader.load(settings, replay_loader.ReplaySpec(
        "orders", 2, DAYS[0], settings.events_topic, settings.s3_bucket, run="r2"), client=s3, force=True)
    assert alone.manifest.replay_topic != shared
    topics = kafka_helpers.admin_client(settings).list_topics(timeout=10).topics
    assert shared in topics  # DAYS[1] is loaded there and not consumed yet
    assert any(shared in note and DAYS[1] in note for note in alone.manifest.superseded_not_cleaned)
    assert manifest_of(s3, settings, DAYS[1]).replay_topic == shared


def test_bad_range_requests_fail_with_one_line_and_write_nothing(settings: Settings, s3: Any) -> None:
    write_days(s3, settings.s3_bucket, settings.events_topic, DAYS[:1], 50)
    spec = replay_loader.ReplaySpec("orders", 2, DAYS[0], settings.events_topic, settings.s3_bucket)
    with pytest.raises(KappaError, match=f"no raw archive objects for {DAYS[1]}"):
        replay_loader.load_range(settings, replay_loader.RangeSpec.of(spec, DAYS), client=s3)
    assert not list(replay_manifest.iter_manifests(s3, settings.s3_bucket))

    backwards = kappa("replay", "load", "--day", DAYS[1], "--last-day", DAYS[0])
    assert backwards.returncode != 0 and f"--last-day {DAYS[0]} is before --day {DAYS[1]}" in backwards.stderr
    zero = kappa("replay", "consume", "--day", DAYS[0], "--consumers", "0")
    assert zero.returncode != 0 and "replay consumers must be 1..64 processes, got 0" in zero.stderr
    unloaded = kappa("replay", "consume", "--day", DAYS[0])
    assert unloaded.returncode != 0 and f"{DAYS[0]} is not loaded" in unloaded.stderr


def test_a_range_takes_every_day_or_none(settings: Settings, s3: Any) -> None:
    bucket, topic = settings.s3_bucket, settings.events_topic
    slots = {replay_manifest.replay_id("orders", 2, day, bucket, topic): day for day in DAYS}
    first, second = slots
    other = replay_lease.acquire(s3, settings.s3_bucket, second, "another-run", what=f"the replay of {DAYS[1]}")
    with pytest.raises(replay_lease.LeaseBusy, match=f"the replay of {DAYS[1]} is already running in another-run"):
        replay_lease.acquire_all(s3, settings.s3_bucket, {s: f"the replay of {d}" for s, d in slots.items()}, "me")
    assert s3_helpers.get_stored(s3, settings.s3_bucket, keys.replay_lease(first)) is None  # not left held
    other.release()

    held = replay_lease.acquire_all(s3, settings.s3_bucket, dict(slots), "me")
    owners = {json.loads(s3_helpers.get_stored(s3, settings.s3_bucket, keys.replay_lease(s)).body)["owner"]
              for s in slots}
    assert owners == {"me"} and len(held.leases) == 2
    with held.kept_alive(interval_s=0.2):
        time.sleep(0.6)
    assert not held.lost.is_set() and all(lease.etag for lease in held.leases)
    held.release()
    assert all(s3_helpers.get_stored(s3, settings.s3_bucket, keys.replay_lease(s)) is None for s in slots)
