"""Soak variant of tests/test_takeover.py: repeated kill -9s, including two quick kills in a row
(the second often lands mid-rebalance), each restart must own every partition again before the
dead member's session timeout would have expired."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
from takeover import COMMANDS, takeover_seconds

from workers import kafka as kafka_helpers
from workers.config import Settings

from .invariants import FIGURES, record_figure

SESSION_TIMEOUT = 40
ROUNDS = 10


@pytest.mark.soak
@pytest.mark.parametrize("role", sorted(COMMANDS))
def test_repeated_kills_each_restart_takes_over_before_the_session_timeout(
    settings: Settings, tmp_path: Path, unique, role: str
) -> None:
    kafka_helpers.ensure_topic(settings, settings.events_topic, 6)
    group = unique("g")
    args = [*COMMANDS[role], "--group", group, "--session-timeout", str(SESSION_TIMEOUT)]
    env = {**os.environ, "KAPPA_INSTANCE_LOCK_DIR": str(tmp_path / "locks"), "KAPPA_INSTANCE_ID": "auto"}
    times, kills = [], 0
    for round_ in range(ROUNDS):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        seconds, landed = takeover_seconds(folder, args, env, 6, timeout=SESSION_TIMEOUT - 5, double=round_ % 2 == 1)
        kills += landed
        assert seconds is not None, f"round {round_}: no takeover before the session timeout"
        times.append(seconds)
        record_figure(f"takeover_s.{role}", seconds)
    print(f"{role}: {kills} kills, takeover median {statistics.median(times):.1f} s, max {max(times):.1f} s")
    assert kills == ROUNDS + ROUNDS // 2
    FIGURES.fault(f"takeover.{role}", count=ROUNDS, kills=kills)
