"""One replay per slot: the S3 lease keeps runs apart, and fenced manifest writes stop a zombie loader.

The zombie test pauses a real `kappa replay load` (SIGSTOP) mid-load until its lease expires, lets a
second loader take the slot over and finish, then resumes the first (SIGCONT): it must stop with one
line, write nothing to the manifest, and leave no topic of its own behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import pytest
from dagster_e2e import wait_for
from dagster_env import ROOT
from replay_data import day_records, write_day

from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.replay import lease as replay_lease
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest

DAY = "2026-11-20"


def test_lease_is_exclusive_reentrant_and_taken_over_after_expiry(settings: Settings, s3: Any) -> None:
    bucket, what = settings.s3_bucket, "the replay of orders v2"
    first = replay_lease.acquire(s3, bucket, "slot-a", "run-1", what=what, ttl_s=2)
    again = replay_lease.acquire(s3, bucket, "slot-a", "run-1", what=what, ttl_s=2)  # same owner: re-entrant
    with pytest.raises(replay_lease.LeaseBusy, match="already running in run-1"):
        replay_lease.acquire(s3, bucket, "slot-a", "run-2", what=what, ttl_s=2)
    assert replay_lease.acquire(s3, bucket, "slot-b", "run-2", what=what, ttl_s=2)  # other slots are free
    gone = replay_lease.acquire(s3, bucket, "slot-a", "run-3", what=what, owner_gone=lambda owner: owner == "run-1")
    with pytest.raises(s3_helpers.Fenced):  # the old holder cannot renew (or delete) what it lost
        again.renew()
    assert first.etag != gone.etag
    first.release()  # a no-op: the lease is run-3's now
    with pytest.raises(replay_lease.LeaseBusy):
        replay_lease.acquire(s3, bucket, "slot-a", "run-4", what=what)
    gone.release()
    assert replay_lease.acquire(s3, bucket, "slot-a", "run-4", what=what, wait_s=0)


def test_manifest_writes_are_fenced_on_the_version_read(settings: Settings, s3: Any) -> None:
    manifest = replay_manifest.ReplayManifest(
        slot="orders-v2-20261120-abcdef",
        replay_id="orders-v2-20261120-abcdef-r1",
        pipeline="orders",
        version=2,
        day=DAY,
        source_topic=settings.events_topic,
        status="loading",
    )
    replay_manifest.write_manifest(s3, settings.s3_bucket, manifest)  # create-only: no previous version
    stale = replay_manifest.read_manifest(s3, settings.s3_bucket, manifest.slot)
    assert stale is not None
    newer = replace(stale, replay_id="orders-v2-20261120-abcdef-r2")
    replay_manifest.write_manifest(s3, settings.s3_bucket, newer)
    with pytest.raises(replay_manifest.ManifestFenced, match="another run rewrote"):
        replay_manifest.write_manifest(s3, settings.s3_bucket, replace(stale, status="loaded"))
    with pytest.raises(replay_manifest.ManifestFenced):  # a second "first" writer loses too
        replay_manifest.write_manifest(s3, settings.s3_bucket, replace(manifest, etag=None))
    stored = replay_manifest.read_manifest(s3, settings.s3_bucket, manifest.slot)
    assert stored is not None and stored.replay_id.endswith("-r2")


def loader(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "replay", "load", "--day", DAY, *args],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_paused_loader_cannot_overwrite_the_manifest_of_the_run_that_took_over(
    settings: Settings, s3: Any
) -> None:
    write_day(s3, settings.s3_bucket, settings.events_topic, DAY, day_records(DAY, 3000, partitions=2))
    spec = replay_loader.ReplaySpec("orders", 2, DAY, settings.events_topic, settings.s3_bucket, run="zombie")
    zombie = loader("--run", "zombie", "--throttle", "300", "--lease-seconds", "3")
    stopped = False
    try:
        topic_a = spec.topic

        def mid_load() -> bool:
            if zombie.poll() is not None:
                return True
            if topic_a not in kafka_helpers.admin_client(settings).list_topics(timeout=5).topics:
                return False
            return 0 < sum(kafka_helpers.end_offsets(settings, topic_a).values()) < 3000

        wait_for(mid_load, 120, "the first loader to be mid-load")
        assert zombie.poll() is None, zombie.communicate()[0][-2000:]
        zombie.send_signal(signal.SIGSTOP)
        stopped = True
        paused_at = sum(kafka_helpers.end_offsets(settings, topic_a).values())
        assert 0 < paused_at < 3000  # the pause landed mid-load
        time.sleep(4)  # past the zombie's 3 s lease

        winner = loader("--run", "winner", "--lease-seconds", "30")
        out, _ = winner.communicate(timeout=180)
        assert winner.returncode == 0, out[-3000:]
        won = replay_manifest.read_manifest(s3, settings.s3_bucket, spec.slot)
        assert won is not None and won.status == "loaded" and won.replay_id.endswith("-winner")
        assert sum(int(o) for o in won.end_offsets.values()) == won.records > 0

        zombie.send_signal(signal.SIGCONT)
        stopped = False
        out, _ = zombie.communicate(timeout=120)
    finally:
        if stopped:
            zombie.send_signal(signal.SIGCONT)
        if zombie.poll() is None:
            zombie.kill()
    assert zombie.returncode != 0
    assert "another run" in out and "Traceback" not in out, out[-2000:]
    after = replay_manifest.read_manifest(s3, settings.s3_bucket, spec.slot)
    assert after is not None and after.etag == won.etag  # not a byte written over the winner's
    topics = kafka_helpers.admin_client(settings).list_topics(timeout=10).topics
    assert topic_a not in topics and won.replay_topic in topics  # the zombie left nothing behind
    assert sum(kafka_helpers.end_offsets(settings, won.replay_topic).values()) == won.records
    print(json.dumps({"zombie_paused_at": paused_at, "winner_records": won.records, "zombie_said": out[-300:]}))
    replay_loader.cleanup(settings, won)


def test_a_lease_of_a_killed_local_process_is_taken_over_at_once(settings: Settings, s3: Any) -> None:
    """kill -9 of `kappa replay load` must not block the re-run for the lease's whole TTL."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = f"{replay_lease.socket.gethostname()}:{child.pid}"
    replay_lease.acquire(s3, settings.s3_bucket, "slot-k", dead, what="x", ttl_s=600)
    with pytest.raises(replay_lease.LeaseBusy):  # a live owner (this test) is respected
        replay_lease.acquire(s3, settings.s3_bucket, "slot-l", replay_lease.default_owner(), what="x")
        replay_lease.acquire(s3, settings.s3_bucket, "slot-l", "elsewhere:1", what="x")
    assert replay_lease.acquire(s3, settings.s3_bucket, "slot-k", "rerun", what="x").owner == "rerun"
