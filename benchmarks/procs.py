"""Child processes: run one, stream its progress to the console, sample the RSS of its process tree.

Every component runs in a process of its own so its peak RSS is its own (``ru_maxrss`` from the
child itself when it is one of ours, sampled from ``/proc`` via psutil for any other command).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
STARTED = time.monotonic()


def say(message: str) -> None:
    """One progress line on stderr, with the time since the benchmark started."""
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr_tail: list[str]
    wall_s: float
    peak_rss_bytes: int
    lines: list[str] = field(default_factory=list)

    def result_json(self) -> dict:
        """The last stdout line that is a JSON object (our child drivers print one)."""
        for line in reversed(self.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        raise RuntimeError(f"no JSON result in output; stderr tail:\n{''.join(self.stderr_tail[-20:])}")


class RssSampler(threading.Thread):
    """Peak of the summed RSS of a process and its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self.done.wait(self.interval)


def run(
    command: Sequence[str],
    *,
    label: str,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    show: Callable[[str], bool] | None = None,
    cwd: Path = ROOT,
    check: bool = True,
) -> Finished:
    """Run ``command``; stderr lines for which ``show(line)`` is true are echoed as progress."""
    full_env = {**os.environ, **(env or {})}
    started = time.monotonic()
    proc = subprocess.Popen(
        list(command), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    sampler = RssSampler(proc.pid)
    sampler.start()
    tail: list[str] = []
    out: list[str] = []

    def pump_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if show and show(line):
                say(f"  {label}: {line.rstrip()[:160]}")

    reader = threading.Thread(target=pump_stdout, daemon=True)
    reader.start()
    assert proc.stderr is not None
    for line in proc.stderr:
        tail.append(line)
        del tail[:-200]
        if show and show(line):
            say(f"  {label}: {line.rstrip()[:160]}")
        if time.monotonic() - started > timeout:
            proc.kill()
            break
    try:
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=10)
    sampler.done.set()
    sampler.join(timeout=2)
    finished = Finished(proc.returncode, "".join(out), tail, time.monotonic() - started, sampler.peak)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{label} failed with exit code {proc.returncode}:\n{''.join(tail[-30:])}\n{''.join(out[-10:])}"
        )
    return finished
