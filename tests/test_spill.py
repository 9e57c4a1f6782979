"""Spill folders left by a killed process are removed by the next one; live owners' folders stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from workers import spill

MAKES_A_SPILL_AND_WAITS = """
import sys, time
from pathlib import Path
from workers import spill
with spill.spill_dir("replay-x", Path(sys.argv[1])) as folder:
    (folder / "run.arrow").write_bytes(b"x" * 1000)
    print(folder, flush=True)
    time.sleep(600)
"""


def start_owner(root: Path) -> tuple[subprocess.Popen, Path]:
    """A process holding a spill folder under ``root`` until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", MAKES_A_SPILL_AND_WAITS, str(root)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_a_killed_owners_spill_is_swept_and_a_live_owners_kept(tmp_path: Path) -> None:
    killed, left_behind = start_owner(tmp_path)
    running, in_use = start_owner(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert left_behind.is_dir() and in_use.is_dir()  # SIGKILL: its folder outlived it
        with spill.spill_dir("replay-y", tmp_path) as mine:
            assert not left_behind.exists()
            assert in_use.is_dir() and (in_use / "run.arrow").exists()
            assert mine.name.startswith(f"{spill.PREFIX}-") and f"-{os.getpid()}-replay-y-" in mine.name
        assert not mine.exists()
    finally:
        running.kill()
        running.wait(30)


def test_only_this_hosts_folders_are_judged(tmp_path: Path) -> None:
    """A temp dir shared between hosts: another host's pid means nothing here, so its folder stays."""
    other = tmp_path / f"{spill.PREFIX}-some.other.host-999999-replay-z-abc"
    unrelated = tmp_path / "replay-orders-v1-20261120-old"
    other.mkdir()
    unrelated.mkdir()
    assert spill.sweep(tmp_path) == []
    assert other.is_dir() and unrelated.is_dir()
