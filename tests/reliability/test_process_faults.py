"""Process faults: SIGKILL the workers at seeded random points, restart them, compare with the truth.

A kill point is a seeded fraction of the work left (read from S3 checkpoints or the replay topic's
end offsets), so every kill lands mid-work whatever the machine's speed; each kill asserts that it
landed (the worker was alive, died of SIGKILL with exit -9, its work was not complete) and each test
asserts it landed all the kills it asked for. Default run: a few kill points per worker (fast);
``-m soak``: 20 per worker. Seeds and kill points are printed (``-s``) and recorded in the figures.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from workers import keys, spill
from workers.config import Settings

from .harness import (
    ARCHIVER_KILL_ARGS,
    DAY,
    LIVE_KILL_ARGS,
    Workers,
    archive_all,
    archiver_progress,
    bounded_args,
    drain_live,
    kill_at,
    kill_fractions,
    load_args,
    processor_progress,
    produce_orders,
    replay_spec,
    topic_progress,
)
from .invariants import (
    archive_records,
    assert_archive_exact,
    assert_dlq_exact,
    assert_live_exact,
    assert_replay_topic_exact,
    assert_reports_exact,
)


def kills(default: int) -> list:
    """``default`` kill points in the default run, 20 in the soak run."""
    return [pytest.param(default, id=f"{default}-kills"), pytest.param(20, id="20-kills", marks=pytest.mark.soak)]


@pytest.mark.parametrize("kills", kills(2))
def test_archiver_sigkill_loses_and_duplicates_nothing(
    settings: Settings, s3, workers: Workers, seed: int, kills: int
) -> None:
    """Archiver killed mid-run (records keep arriving between runs), restarted; the archive is exact."""
    rng = random.Random(seed)
    produced = produce_orders(settings, 30_000, seed, days=2).count
    landed = []
    for point, fraction in enumerate(kill_fractions(rng, kills)):
        archiver = workers.start(f"archiver-{point}", *ARCHIVER_KILL_ARGS, "--until-end")
        landed.append(kill_at(archiver, fraction, "sigkill.archiver", archiver_progress(settings, s3),
                              ready="assigned", seed=seed, point=point))
        produced += produce_orders(settings, rng.randrange(3_000, 8_000), seed + point + 1, days=2).count
    assert len(landed) == kills
    archive_all(workers)
    check = assert_archive_exact(settings, s3)
    assert check.records == produced


@pytest.mark.parametrize("kills", kills(2))
def test_live_processor_sigkill_keeps_results_exact(
    settings: Settings, s3, workers: Workers, seed: int, kills: int
) -> None:
    """Live v2 processor killed mid-batch/mid-checkpoint, restarted; results and DLQ stay exact."""
    rng = random.Random(seed)
    produce_orders(settings, 30_000, seed)
    prefix = keys.live_prefix("orders", 2)
    landed = []
    for point, fraction in enumerate(kill_fractions(rng, kills)):
        live = workers.start(f"live-{point}", *LIVE_KILL_ARGS)
        progress = processor_progress(settings, s3, prefix, settings.events_topic)
        landed.append(kill_at(live, fraction, "sigkill.processor.live", progress, ready="records=",
                              seed=seed, point=point))
        produce_orders(settings, rng.randrange(2000, 6000), seed + point + 1)
    assert len(landed) == kills
    drain_live(workers, settings, s3)
    archive_all(workers)
    assert_archive_exact(settings, s3)
    assert_live_exact(settings, s3, version=2)
    assert_dlq_exact(settings, s3, settings.dlq_topic)


@pytest.mark.parametrize("kills", kills(2))
def test_bounded_processor_sigkill_gives_the_same_report(
    settings: Settings, s3, workers: Workers, seed: int, kills: int
) -> None:
    """The replay consumer killed at random points, restarted in the same group; reports exact."""
    rng = random.Random(seed)
    produce_orders(settings, 40_000, seed, start=f"{DAY}T00:00:00Z")
    archive_all(workers)
    spec = replay_spec(settings)
    workers.run("load", *load_args(spec))
    progress = processor_progress(settings, s3, keys.processor_prefix(spec.pipeline, spec.version, spec.group),
                                  spec.topic)
    landed = []
    # no new records between rounds: small fractions keep work left for every one of many kills
    for point, fraction in enumerate(kill_fractions(rng, kills, high=min(0.8, 2.4 / kills))):
        bounded = workers.start(f"bounded-{point}", *bounded_args(spec, batch_size=20))
        landed.append(kill_at(bounded, fraction, "sigkill.processor.bounded", progress, ready="records=",
                              seed=seed, point=point))
    assert len(landed) == kills
    workers.run("bounded-final", *bounded_args(spec), timeout=300)
    assert_archive_exact(settings, s3)
    assert_replay_topic_exact(settings, s3, settings.events_topic, spec.topic, spec.day)
    assert_reports_exact(settings, s3, 2, [spec.day])
    assert_dlq_exact(settings, s3, spec.dlq_topic, spec.day)


@pytest.mark.parametrize("kills", kills(2))
def test_replay_loader_sigkill_then_rerun_replays_each_record_once(
    settings: Settings, s3, workers: Workers, seed: int, kills: int, tmp_path: Path
) -> None:
    """The loader killed while sorting or producing; a plain re-run leaves an exact replay topic and report,
    and removes the sort spill folders the killed loaders left on local disk.

    The loaders spill under this test's own temp dir: any spill on the host sweeps the folders of
    dead processes, so a loader of a test running alongside once swept these before the check."""
    rng = random.Random(seed)
    temp = tmp_path / "tmp"
    temp.mkdir()
    own_temp = {"TMPDIR": str(temp)}
    produce_orders(settings, 60_000, seed, start=f"{DAY}T00:00:00Z")
    archive_all(workers)
    spec = replay_spec(settings, version=1)
    progress = topic_progress(settings, spec.topic, len(archive_records(s3, spec.bucket, spec.source_topic, spec.day)))
    landed, killed = [], []
    for point, fraction in enumerate(kill_fractions(rng, kills)):
        loader = workers.start(f"load-{point}", *load_args(spec), "--throttle", "10000", env=own_temp)
        landed.append(kill_at(loader, fraction, "sigkill.replay_loader", progress, ready=f"replay {spec.replay_id}",
                              resumes=False, seed=seed, point=point))
        killed.append(loader.pid)
    assert len(landed) == kills

    def left_behind() -> list[Path]:
        return [folder for pid in killed for folder in temp.glob(f"{spill.PREFIX}-*-{pid}-replay-*")]

    assert left_behind(), "no killed loader left a spill folder: the kills missed the sort and produce phases"
    workers.run("load-final", *load_args(spec), timeout=300, env=own_temp)
    assert not left_behind(), f"the re-run did not sweep the killed loaders' spill folders: {left_behind()}"
    assert_archive_exact(settings, s3)
    assert_replay_topic_exact(settings, s3, settings.events_topic, spec.topic, spec.day)
    workers.run("bounded", *bounded_args(spec), timeout=300)
    assert_reports_exact(settings, s3, 1, [spec.day])
