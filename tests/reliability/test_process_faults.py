"""Process faults: SIGKILL the workers at seeded random points, restart them, compare with the truth.

Default run: a few kill points per worker (fast); ``-m soak``: 20 per worker. Seeds and kill points
are printed (``-s``) and recorded in the figures JSON.
"""

from __future__ import annotations

import random

import pytest

from workers.config import Settings

from .harness import (
    ARCHIVER_KILL_ARGS,
    DAY,
    LIVE_ARGS,
    Workers,
    archive_all,
    bounded_args,
    drain_live,
    kill_after,
    kill_points,
    load_args,
    produce_orders,
    replay_spec,
)
from .invariants import (
    assert_archive_exact,
    assert_dlq_exact,
    assert_live_exact,
    assert_replay_topic_exact,
    assert_reports_exact,
)


def kills(default: int) -> list:
    """``default`` kill points in the default run, 20 in the soak run."""
    return [pytest.param(default, id=f"{default}-kills"), pytest.param(20, id="20-kills", marks=pytest.mark.soak)]


@pytest.mark.parametrize("kills", kills(4))
def test_archiver_sigkill_loses_and_duplicates_nothing(
    settings: Settings, s3, workers: Workers, seed: int, kills: int
) -> None:
    """Archiver killed mid-run (records keep arriving between runs), restarted; the archive is exact."""
    rng = random.Random(seed)
    produced = produce_orders(settings, 60_000, seed, days=2).count
    injected = 0
    for point, delay in enumerate(kill_points(rng, kills, 0.0, 1.5)):
        archiver = workers.start(f"archiver-{point}", *ARCHIVER_KILL_ARGS, "--until-end")
        injected += kill_after(archiver, delay, "sigkill.archiver", seed, point, ready="assigned")
        produced += produce_orders(settings, rng.randrange(5_000, 15_000), seed + point + 1, days=2).count
    archive_all(workers)
    check = assert_archive_exact(settings, s3)
    assert check.records == produced
    assert injected >= kills * 3 // 4, f"only {injected} of {kills} kills hit a running archiver"


@pytest.mark.parametrize("kills", kills(3))
def test_live_processor_sigkill_keeps_results_exact(
    settings: Settings, s3, workers: Workers, seed: int, kills: int
) -> None:
    """Live v2 processor killed mid-batch/mid-checkpoint, restarted; results and DLQ stay exact."""
    rng = random.Random(seed)
    produce_orders(settings, 30_000, seed)
    for point, delay in enumerate(kill_points(rng, kills, 0.0, 2.5)):
        live = workers.start(f"live-{point}", *LIVE_ARGS)
        kill_after(live, delay, "sigkill.processor.live", seed, point, ready="records=")
        produce_orders(settings, rng.randrange(2000, 6000), seed + point + 1)
    drain_live(workers, settings, s3)
    archive_all(workers)
    assert_archive_exact(settings, s3)
    assert_live_exact(settings, s3, version=2)
    assert_dlq_exact(settings, s3, settings.dlq_topic)


@pytest.mark.parametrize("kills", kills(3))
def test_bounded_processor_sigkill_gives_the_same_report(
    settings: Settings, s3, workers: Workers, seed: int, kills: int
) -> None:
    """The replay consumer killed at random points, restarted in the same group; reports exact."""
    rng = random.Random(seed)
    produce_orders(settings, 40_000, seed, start=f"{DAY}T00:00:00Z")
    archive_all(workers)
    spec = replay_spec(settings)
    workers.run("load", *load_args(spec))
    for point, delay in enumerate(kill_points(rng, kills, 0.0, 2.0)):
        bounded = workers.start(f"bounded-{point}", *bounded_args(spec, batch_size=200))
        kill_after(bounded, delay, "sigkill.processor.bounded", seed, point, ready="records=")
    workers.run("bounded-final", *bounded_args(spec), timeout=300)
    assert_archive_exact(settings, s3)
    assert_replay_topic_exact(settings, s3, settings.events_topic, spec.topic, spec.day)
    assert_reports_exact(settings, s3, 2, [spec.day])
    assert_dlq_exact(settings, s3, spec.dlq_topic, spec.day)


@pytest.mark.parametrize("kills", kills(3))
def test_replay_loader_sigkill_then_rerun_replays_each_record_once(
    settings: Settings, s3, workers: Workers, seed: int, kills: int
) -> None:
    """The loader killed while sorting or producing; a plain re-run leaves an exact replay topic and report."""
    rng = random.Random(seed)
    produce_orders(settings, 60_000, seed, start=f"{DAY}T00:00:00Z")
    archive_all(workers)
    spec = replay_spec(settings, version=1)
    for point, delay in enumerate(kill_points(rng, kills, 0.3, 2.5)):
        loader = workers.start(f"load-{point}", *load_args(spec), "--throttle", "40000")
        kill_after(loader, delay, "sigkill.replay_loader", seed, point)
    workers.run("load-final", *load_args(spec), timeout=300)
    assert_archive_exact(settings, s3)
    assert_replay_topic_exact(settings, s3, settings.events_topic, spec.topic, spec.day)
    workers.run("bounded", *bounded_args(spec), timeout=300)
    assert_reports_exact(settings, s3, 1, [spec.day])
