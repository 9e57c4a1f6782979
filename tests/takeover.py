"""Takeover after ``kill -9``: how long until a restarted archiver owns its partitions again.

Used by ``tests/test_takeover.py`` and, as a script, to measure the membership choices on the
real stack (the numbers in docs/ARCHITECTURE.md, "Fast takeover")::

    .venv/bin/python tests/takeover.py --rounds 5 [--double]

Each round: one worker subprocess (the real CLI; the script measures the archiver) owns every
partition of a fresh topic, gets ``kill -9``, and is restarted at once; the takeover time is from
the kill until the restarted process logs an assignment covering every partition. ``--double``
kills the restarted process again 1 s after its start (often mid-rebalance) and times the third.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ASSIGNED = re.compile(r"kappa\.(?:archiver|processor): assigned \{([^}]*)\}")
REVOKED = re.compile(r"kappa\.(?:archiver|processor): revoked \[([^\]]*)\]")


@dataclass
class Worker:
    """One ``kappa archiver|processor`` process (``args`` start with the command) with its log file."""

    log: Path
    proc: subprocess.Popen

    @classmethod
    def start(cls, log: Path, args: list[str], env: dict[str, str]) -> Worker:
        proc = subprocess.Popen([sys.executable, "-m", "workers.cli", *args],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        return cls(log, proc)

    def owned(self) -> set[int]:
        """Partitions owned now, from the assigned/revoked log lines (cooperative: incremental)."""
        owned: set[int] = set()
        for line in self.log.read_text().splitlines():
            if match := ASSIGNED.search(line):
                owned |= {int(item.split(":")[0]) for item in match[1].split(",") if item.strip()}
            elif match := REVOKED.search(line):
                owned -= {int(item) for item in match[1].split(",") if item.strip()}
        return owned

    def wait_owns(self, partitions: set[int], timeout: float) -> float | None:
        """Seconds until this worker owns ``partitions`` (None: not within ``timeout``)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.owned() >= partitions:
                return time.monotonic() - started
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-3000:]
                raise AssertionError(f"{self.log.stem} exited with {self.proc.returncode}:\n{tail}")
            time.sleep(0.05)
        return None

    def kill(self) -> bool:
        """SIGKILL; True if the process was alive (the kill landed)."""
        alive = self.proc.poll() is None
        self.proc.kill()
        self.proc.wait(10)
        return alive

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def takeover_seconds(folder: Path, args: list[str], env: dict[str, str], partitions: int,
                     timeout: float, double: bool = False,
                     check: Callable[[Worker], None] | None = None) -> tuple[float | None, int]:
    """Kill the owner of every partition, restart it, return (takeover seconds or None, kills landed).
    ``check`` runs against the restarted worker after its takeover, before it is stopped."""
    everything = set(range(partitions))
    first = Worker.start(folder / "first.log", args, env)
    workers = [first]
    try:
        if first.wait_owns(everything, 90) is None:
            raise AssertionError(f"the first worker never owned {everything}:\n{first.log.read_text()[-3000:]}")
        kills = int(first.kill())
        killed_at = time.monotonic()
        second = Worker.start(folder / "second.log", args, env)
        workers.append(second)
        last = second
        if double:
            time.sleep(1.0)
            kills += int(second.kill())
            killed_at = time.monotonic()
            last = Worker.start(folder / "third.log", args, env)
            workers.append(last)
        waited = last.wait_owns(everything, timeout)
        seconds = None if waited is None else time.monotonic() - killed_at
        if seconds is not None and check is not None:
            check(last)
        return seconds, kills
    finally:
        for worker in workers:
            worker.stop()


def handover_seconds(folder: Path, args: list[str], env: dict[str, str], partitions: int, timeout: float,
                     how: str) -> float | None:
    """Two members; one is stopped (SIGTERM, ``how="stop"``) or killed for good (``"kill"``): seconds
    until the other owns every partition (None: not within ``timeout``). Static members send no
    LeaveGroup, so this is where the session timeout shows."""
    everything = set(range(partitions))
    first = Worker.start(folder / "first.log", args, env)
    second = Worker.start(folder / "second.log", args, env)
    try:
        deadline = time.monotonic() + 90
        while not (first.owned() and second.owned() and first.owned() | second.owned() >= everything):
            if time.monotonic() > deadline:
                raise AssertionError("the two members never shared the partitions")
            time.sleep(0.1)
        gone_at = time.monotonic()
        if how == "kill":
            first.kill()
        else:
            first.stop()
        waited = second.wait_owns(everything, timeout)
        return None if waited is None else time.monotonic() - gone_at
    finally:
        first.stop()
        second.stop()


#: the worker commands the takeover tests run (with --group and --session-timeout appended)
COMMANDS = {
    "archiver": ["archiver", "--log-interval", "1", "--flush-seconds", "1"],
    "processor": ["processor", "-p", "orders", "-v", "2", "--start", "earliest", "--checkpoint-seconds", "1",
                  "--progress", "none"],
}

VARIANTS = {
    "classic, dynamic": ["--group-protocol", "classic", "--instance-id", "none"],
    "classic, static": ["--group-protocol", "classic"],
    "consumer (KIP-848), dynamic": ["--group-protocol", "consumer", "--instance-id", "none"],
    "consumer (KIP-848), static": ["--group-protocol", "consumer"],
}


def measure(rounds: int, double: bool, session_timeout: int, timeout: float, variants: list[str],
            handover: str | None = None) -> None:
    """Print a markdown table of takeover times per variant (each round on a fresh topic and group)."""
    from workers import kafka as kafka_helpers
    from workers import s3 as s3_helpers
    from workers.config import apply_stack_env, load_settings

    apply_stack_env()
    print(f"| membership | rounds | median s | max s | not within {timeout:.0f} s |\n|---|---|---|---|---|")
    for name, extra in VARIANTS.items():
        if variants and not any(v in name for v in variants):
            continue
        times: list[float] = []
        missed = 0
        for _round in range(rounds):
            tag = uuid.uuid4().hex[:8]
            env = {**os.environ, "KAPPA_EVENTS_TOPIC": f"takeover-{tag}", "KAPPA_S3_BUCKET": f"kappa-takeover-{tag}",
                   "KAPPA_INSTANCE_LOCK_DIR": f"/tmp/kappa-takeover-locks-{tag}"}
            settings = load_settings(env)
            kafka_helpers.ensure_topic(settings, settings.events_topic, 6)
            s3_helpers.ensure_bucket(s3_helpers.s3_client(settings), settings.s3_bucket)
            folder = Path(f"/tmp/kappa-takeover-{tag}")
            folder.mkdir()
            args = ["archiver", "--group", f"takeover-{tag}", "--session-timeout", str(session_timeout),
                    "--log-interval", "1", "--flush-seconds", "1", *extra]
            try:
                if handover:
                    seconds, kills = handover_seconds(folder, args, env, 6, timeout, handover), 1
                else:
                    seconds, kills = takeover_seconds(folder, args, env, 6, timeout, double)
            except AssertionError as exc:  # e.g. KIP-848 + static: "instance ID is still used" is fatal
                print(f"<!-- {name}: {str(exc).splitlines()[0]} -->", flush=True)
                seconds, kills = None, (2 if double else 1)
            assert kills == (2 if double else 1), "a kill did not land"
            if seconds is None:
                missed += 1
            else:
                times.append(seconds)
            kafka_helpers.delete_topics(settings, [settings.events_topic])
        median = f"{statistics.median(times):.1f}" if times else "-"
        worst = f"{max(times):.1f}" if times else "-"
        print(f"| {name} | {rounds} | {median} | {worst} | {missed} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--double", action="store_true", help="two quick kills, time the third process")
    parser.add_argument("--session-timeout", type=int, default=45, help="classic session timeout (s)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--variant", action="append", default=[], help="only variants containing this text")
    parser.add_argument("--handover", choices=["stop", "kill"],
                        help="two members, one stopped/killed for good: time until the other owns everything")
    options = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    measure(options.rounds, options.double, options.session_timeout, options.timeout, options.variant,
            options.handover)
