"""Consume a replay: the bounded processor over its topic, as one or N members of its group.

The processor's group membership spreads the replay topic's partitions over the members and hands them
over on rebalances (per-partition S3 checkpoints), and every member stops once every partition is
finished by any of them; so N processes started with the same command are the scale-out of a replay
(``replay.consumers`` in Dagster, ``kappa replay consume --consumers N``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from workers.errors import KappaError
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest

#: More members than this on one replay is a typo rather than a plan (partitions cap useful members anyway).
MAX_CONSUMERS = 64


def valid_consumers(consumers: int) -> int:
    if not 1 <= consumers <= MAX_CONSUMERS:
        raise KappaError(f"replay consumers must be 1..{MAX_CONSUMERS} processes, got {consumers}")
    return consumers


def processor_command(
    pipeline: str, version: int, manifest: ReplayManifest, extra: Sequence[str] = (), progress: str = "log"
) -> list[str]:
    """The live worker's entry point, in bounded replay mode, over the manifest's topic and group.

    Over a replay topic written in event-time order the grace is finite (``processor_grace_ms``):
    bounded state, same report. ``extra`` (``replay.processor_args``) comes last, so it can override.
    """
    if not manifest.replay_topic or not manifest.group or not manifest.dlq_topic:
        raise KappaError(f"replay {manifest.replay_id} has no topic or group yet: load it first")
    grace_ms = replay_manifest.processor_grace_ms(manifest)
    grace = [] if grace_ms is None else ["--grace-seconds", f"{grace_ms / 1000:g}"]
    return [
        sys.executable, "-m", "workers.cli", "processor",
        "--pipeline", pipeline, "--version", str(version),
        "--topic", manifest.replay_topic, "--group", manifest.group, "--dlq-topic", manifest.dlq_topic,
        *(("--late-topic", manifest.late_topic) if manifest.late_topic else ()),
        "--from-beginning", "--until-end", "--progress", progress,
        *grace, *extra,
    ]


@dataclass
class Member:
    """An extra member we started; its log goes to a file (a pipe nobody reads would block it when full)."""

    process: subprocess.Popen
    log: IO[bytes]

    def last_line(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"


def start_members(command: Sequence[str], count: int, env: Mapping[str, str] | None = None) -> list[Member]:
    """``count`` extra members of the replay group (the caller runs or watches the first one itself)."""
    at = command.index("--progress")
    quiet = [*command[: at + 1], "none", *command[at + 2:]]
    members = []
    for _ in range(count):
        log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by wait_members or stop_members)
        process = subprocess.Popen(quiet, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        members.append(Member(process, log))
    return members


def wait_members(members: list[Member], timeout: float | None = None) -> None:
    """Every extra member exited 0 (each stops once the group reached the end offsets), else one line why."""
    failed = []
    for index, member in enumerate(members, start=2):
        code = member.process.wait(timeout)
        if code != 0:
            failed.append(f"member {index} exited {code}: {member.last_line()}")
        member.log.close()
    if failed:
        raise KappaError("replay consumer " + "; ".join(failed))


def stop_members(members: list[Member]) -> None:
    """Stop extra members we started (by their own pids) after the first one failed."""
    for member in members:
        if member.process.poll() is None:
            member.process.terminate()
    for member in members:
        try:
            member.process.wait(60)
        except subprocess.TimeoutExpired:
            member.process.kill()
        member.log.close()
