"""A processor process gets one polars thread; other commands, and an explicit POLARS_MAX_THREADS, keep theirs.

Each case is a fresh interpreter: polars sizes its pool once, when it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers.polars_pool import THREADS_ENV, command_of

PROBE = "import sys; sys.argv = {argv!r}; {entry}; import polars; print(polars.thread_pool_size())"


def pool_size(argv: list[str], entry: str = "import workers.cli", threads: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    if threads is not None:
        env[THREADS_ENV] = threads
    code = PROBE.format(argv=argv, entry=entry)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_command_word_skips_global_options() -> None:
    assert command_of(["kappa", "--debug", "processor", "--pipeline", "orders"]) == "processor"
    assert command_of(["kappa", "replay", "load"]) == "replay"
    assert command_of(["kappa", "--help"]) is None


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="polars' default is one thread on one core")
def test_processor_gets_one_thread_other_commands_the_default() -> None:
    default = pool_size(["x"], entry="pass")
    assert default > 1
    assert pool_size(["kappa", "--debug", "processor", "--help"]) == 1
    assert pool_size(["kappa", "report", "--help"]) == default
    assert pool_size(["kappa", "archiver", "--help"]) == default


def test_an_explicit_setting_wins() -> None:
    assert pool_size(["kappa", "processor"], threads="2") == 2


def test_the_benchmark_child_sizes_as_the_command() -> None:
    """benchmarks.child times the processor in its own process: it must run with the command's pool."""
    assert pool_size(["child.py", "processor", "{}"], entry="import benchmarks.child") == 1
