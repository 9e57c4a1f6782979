"""Dagster test helpers: a throwaway DAGSTER_HOME with the repo's dagster.yaml, and `dagster` subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).with_name("dagster"))


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh instance (sqlite storage, queued run coordinator) exported as DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    yield home


def dagster_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `dagster` CLI from the repo root with the current environment (bucket, topics, home)."""
    return subprocess.run(
        [DAGSTER, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fresh_resources() -> dict[str, Any]:
    """Resources built from the environment *now* (the test's bucket), not at import time."""
    from kappa_dagster.defs.resources import ReplayOptions, build_resources

    return {**build_resources(), "replay": ReplayOptions()}
