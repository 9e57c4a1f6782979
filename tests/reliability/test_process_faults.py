"""Process faults: SIGKILL the workers at seeded random points, restart them, compare with the truth.

Default run: a few kill points per worker (fast); ``-m soak``: the full count (>= 20 per worker).
Seeds and kill points are printed (``-s``) and recorded in the figures JSON.
"""

from __future__ import annotations

import random

import pytest

from workers.config import Settings

from .harness import ARCHIVER_ARGS, Workers, kill_after, kill_points, produce_orders
from .invariants import assert_archive_exact

KILL_COUNTS = [pytest.param(4, id="4-kills"), pytest.param(20, id="20-kills", marks=pytest.mark.soak)]


@pytest.mark.parametrize("kills", KILL_COUNTS)
def test_archiver_sigkill_loses_and_duplicates_nothing(
    settings: Settings, s3, workers: Workers, seed: int, kills: int
) -> None:
    """Archiver killed mid-run (records keep arriving between runs), restarted; the archive is exact."""
    rng = random.Random(seed)
    produced = produce_orders(settings, 30_000, seed, days=2).count
    injected = 0
    for point, delay in enumerate(kill_points(rng, kills, 0.0, 2.0)):
        archiver = workers.start(f"archiver-{point}", *ARCHIVER_ARGS, "--until-end")
        injected += kill_after(archiver, delay, "sigkill.archiver", seed, point, ready="assigned")
        produced += produce_orders(settings, rng.randrange(2000, 8000), seed + point + 1, days=2).count
    workers.run("archiver-final", *ARCHIVER_ARGS, "--until-end", timeout=300)
    check = assert_archive_exact(settings, s3)
    assert check.records == produced
    assert injected >= kills * 3 // 4, f"only {injected} of {kills} kills hit a running archiver"
