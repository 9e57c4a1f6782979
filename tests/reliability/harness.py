"""Running the real CLIs as subprocesses, killing them at seeded points, and bounded waiting.

Every worker in the suite is started the way an operator starts it (``python -m workers.cli ...``)
with the test's environment (private or shared stack), its output kept in a log file the test can
grep. Kill points come from a seeded RNG that is printed, so a failing run can be replayed with
``KAPPA_RELIABILITY_SEED=<seed>``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import FlexibleChecksumError
from confluent_kafka import KafkaException

from tests.committed import committed_offsets
from workers import keys
from workers.config import Settings, load_settings
from workers.dev.generator import Faults, ProduceSummary, produce_events
from workers.dev.stack import Stack, read_pid
from workers.errors import KappaError
from workers.kafka import end_offsets, is_transient
from workers.processor.state import list_states
from workers.replay import manifest as replay_manifest
from workers.replay.loader import ReplaySpec
from workers.s3 import s3_client

from .invariants import FIGURES

T = TypeVar("T")


def cli(*args: str) -> list[str]:
    """The argv of a ``kappa`` command run with this interpreter."""
    return [sys.executable, "-m", "workers.cli", *args]


#: S3Proxy's filesystem backend replaces an object non-atomically: a GET racing the PUT of the same
#: key (a checkpoint being rewritten) can fail its checksum. Pollers retry; real S3 never does this.
TRANSIENT_READ_ERRORS: tuple[type[BaseException], ...] = (FlexibleChecksumError,)


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25,
               detail: Callable[[], str] | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` (and ``detail()``,
    e.g. where the work stood and a worker's last lines) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except TRANSIENT_READ_ERRORS:
            result = None
        except KafkaException as exc:  # a probe right after a fault (e.g. the group's coordinator moving)
            if not is_transient(exc.args[0]):
                raise
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            explained = f"; {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{explained}")
        time.sleep(interval)


#: worker commands that stop on SIGTERM/SIGINT once they log STOP_HANDLED (see Worker.wait_handles_stop)
STOPPABLE = ("processor", "archiver")
STOP_HANDLED = "joining group"


@dataclass
class Worker:
    """One CLI process; stdout+stderr go to ``log``."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    peak_rss_kb: int = 0
    #: where this start's output begins in ``log`` (a restart appends to it)
    log_start: int = 0

    def start(self) -> Worker:
        with open(self.log, "ab") as out:
            out.write(f"\n$ {' '.join(self.argv[2:])}\n".encode())
            out.flush()
            self.log_start = out.tell()
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum``; a stop (SIGTERM, SIGINT) to a processor or archiver only once it handles one."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.wait_handles_stop()
        if self.alive():
            os.kill(self.pid, signum)

    def wait_handles_stop(self, timeout: float = 60) -> None:
        """Until the worker logged that it joins its group: its stop handlers are installed by then.

        Before that a stop meets Python's default action (exit -15 while it still imports), which
        is not the stop a test asks about: a test whose wait was already true when it restarted a
        worker (everything checkpointed) sent SIGTERM into the imports under load."""
        if not any(command in self.argv for command in STOPPABLE):
            return
        deadline = time.monotonic() + timeout
        while self.alive() and STOP_HANDLED not in self.output_of_this_start() and time.monotonic() < deadline:
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        """The exit code; fails (and kills the process) if it is still running after ``timeout``."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.dump_stacks()
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"{self.name} did not exit within {timeout:.0f}s; log tail:\n{self.tail(120)}"
                                 ) from None

    def dump_stacks(self) -> None:
        """A running worker prints its threads' stacks to its log (SIGUSR1, see ``workers.cli.main``):
        where it waits or hangs."""
        if self.alive():
            self.signal(signal.SIGUSR1)
            time.sleep(1.0)

    def rss_kb(self) -> int:
        """Current resident memory (0 once exited); also tracks the peak seen."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        rss = int(match.group(1)) if match else 0
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        return rss

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def output_of_this_start(self) -> str:
        with open(self.log, "rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@dataclass
class Workers:
    """Factory of :class:`Worker` s for one test; everything still running is killed at teardown."""

    directory: Path
    started: list[Worker] = field(default_factory=list)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Worker:
        """Start ``kappa <args>`` with the current environment (the test's stack) plus ``env``."""
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        worker = Worker(name, cli(*args), self.directory / f"{name}.log", environment)
        self.started.append(worker.start())
        return worker

    def run(self, name: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> Worker:
        """Start and wait; fails with the log tail unless it exits 0."""
        worker = self.start(name, *args, env=env)
        code = worker.wait(timeout)
        assert code == 0, f"{name} exited {code}; log tail:\n{worker.tail()}"
        return worker

    def cleanup(self) -> None:
        for worker in self.started:
            if worker.alive():
                worker.kill()


def seed_for(test_name: str) -> int:
    """``KAPPA_RELIABILITY_SEED`` if set (to replay a failure), else a fresh random seed; printed either way."""
    raw = os.environ.get("KAPPA_RELIABILITY_SEED")
    seed = int(raw) if raw else random.SystemRandom().randrange(2**31)
    print(f"[reliability] {test_name}: seed={seed} (replay with KAPPA_RELIABILITY_SEED={seed})")
    return seed


#: A worker's progress as ``(done, total)`` records, read where its work becomes durable (S3 checkpoints,
#: a topic's end offsets), never from the worker's own log.
ProgressFn = Callable[[], tuple[int, int]]


@dataclass
class Kill:
    """One SIGKILL that landed: the worker was alive and mid-work, and died of the signal (exit -9)."""

    kind: str
    pid: int
    done_before: int
    done_after: int
    total: int


def kill_fractions(rng: random.Random, count: int, low: float = 0.0, high: float = 0.8) -> list[float]:
    """``count`` seeded kill points: fractions of the work left when the worker became ready."""
    return [round(rng.uniform(low, high), 3) for _ in range(count)]


def wait_ready(worker: Worker, ready: str | None, timeout: float = 120) -> None:
    """Bounded wait until ``worker`` logs ``ready``; fails if it exits first."""
    if ready is not None:
        wait_until(lambda: ready in worker.output() or not worker.alive(), timeout, f"{worker.name} to log {ready!r}")
    assert worker.alive(), f"{worker.name} exited before logging {ready!r}:\n{worker.tail()}"


def read_progress(progress: ProgressFn) -> tuple[int, int]:
    """``progress()``, retrying S3Proxy's transient read errors."""
    return wait_until(progress, 30, "a progress reading")


def kill_at(worker: Worker, fraction: float, kind: str, progress: ProgressFn, ready: str | None = None,
            resumes: bool = True, **detail: Any) -> Kill:
    """SIGKILL ``worker`` once it has done ``fraction`` of the work left when it logged ``ready``
    (``resumes=False``: of all the work, for a worker that starts over, like the replay loader).

    The kill point is a share of real progress, not a delay, so it always lands mid-work whatever the
    machine's speed; :func:`sigkill` asserts that it did.
    """
    wait_ready(worker, ready)
    start, total = read_progress(progress) if resumes else (0, read_progress(progress)[1])
    assert start < total, f"{worker.name}: no work left at the kill point ({start}/{total}): the test is broken"
    target = start + fraction * (total - start)
    wait_until(lambda: not worker.alive() or read_progress(progress)[0] >= target, 180,
               f"{worker.name} to reach {target:.0f}/{total}")
    return sigkill(worker, kind, progress, fraction=fraction, ready=ready or "start", **detail)


def sigkill(worker: Worker, kind: str, progress: ProgressFn | None = None, **detail: Any) -> Kill:
    """SIGKILL ``worker`` and assert the fault landed before counting it in the figures.

    Landed means: the worker was alive when signalled, it died of SIGKILL (not of its own exit), and,
    when ``progress`` is given, its work was not complete after the kill (it was killed mid-work).
    """
    assert worker.alive(), f"{worker.name} exited ({worker.exit_code()}) before the kill: no fault\n{worker.tail()}"
    before = read_progress(progress) if progress else (0, 0)
    os.kill(worker.pid, signal.SIGKILL)
    code = worker.wait(30)
    assert code == -signal.SIGKILL, f"{worker.name} exited {code} on its own before SIGKILL reached it"
    after = read_progress(progress) if progress else (0, 1)
    assert after[0] < after[1], f"{worker.name} had finished its work ({after[0]}/{after[1]}) when killed"
    kill = Kill(kind, worker.pid, before[0], after[0], after[1])
    work = {"done_before": kill.done_before, "done_after": kill.done_after, "total": kill.total} if progress else {}
    FIGURES.fault(kind, pid=kill.pid, exit=code, **work, **detail)
    print(f"[reliability] {kind}: SIGKILL pid {kill.pid} {work} {detail}")
    return kill


def kill_after(worker: Worker, delay: float, kind: str, seed: int, point: int, ready: str | None = None) -> bool:
    """SIGKILL ``worker`` ``delay`` seconds after its log shows ``ready`` (or after start); asserts it landed.

    For kill points in time where no progress measure exists; :func:`kill_at` is preferred.
    """
    wait_ready(worker, ready)
    time.sleep(delay)
    sigkill(worker, kind, seed=seed, point=point, after_s=delay, after=ready or "start")
    return True


def end_total(settings: Settings, topic: str, timeout: float = 30) -> dict[int, int]:
    """End offsets of ``topic`` (``{}`` while it does not exist, e.g. being recreated)."""
    try:
        return end_offsets(settings, topic, timeout)
    except (KafkaException, KappaError):
        return {}


def durable_progress(ends: dict[int, int], durable: Callable[[], dict[int, int]]) -> ProgressFn:
    """Progress towards ``ends``: the durable next offset per partition, capped at its end."""
    return lambda: (capped(durable(), ends), sum(ends.values()))


def archiver_progress(settings: Settings, client: Any) -> ProgressFn:
    """The archiver's S3 checkpoints vs the events topic's end offsets now."""
    ends = end_offsets(settings, settings.events_topic)
    return durable_progress(ends, lambda: archived_offsets(client, settings.s3_bucket, settings.events_topic))


def processor_progress(settings: Settings, client: Any, prefix: str, topic: str) -> ProgressFn:
    """A processor's committed S3 states (under ``prefix``) vs ``topic``'s end offsets now.

    A shuffled pipeline has two durable positions: stage 1's committed offsets on ``topic`` and
    stage 2's S3 states on the repartition topic. Its progress adds both (each capped at its end), so
    it is complete only once stage 2 is, and a fault lands mid-stream while either stage still works.
    """
    ends = end_offsets(settings, topic)
    total = sum(ends.values())

    def progress() -> tuple[int, int]:
        states = list_states(client, settings.s3_bucket, prefix)
        shuffled = next((s for s in states.values() if "shuffle" in s), None)
        if shuffled is None:
            return capped({p: int(s["next_offset"] or 0) for p, s in states.items()}, ends), total
        first = capped(group_committed(settings, shuffled["group"], topic, list(ends)), ends)
        repartition = {p: o for p, o in end_offsets(settings, shuffled["topic"]).items() if o > 0}
        second = capped({p: int(s["next_offset"] or 0) for p, s in states.items()}, repartition)
        return first + second, total + sum(repartition.values())

    return progress


def capped(positions: dict[int, int], ends: dict[int, int]) -> int:
    """Records done: each partition's position, capped at its end (never negative)."""
    return sum(min(max(positions.get(p, 0), 0), end) for p, end in ends.items())


def topic_progress(settings: Settings, topic: str, total: int) -> ProgressFn:
    """Records in ``topic`` (e.g. a replay topic being loaded) vs the ``total`` it must end with."""
    return lambda: (sum(end_total(settings, topic, 5).values()), total)


def secrets_in(text: str, secrets: list[str]) -> list[str]:
    """Which of ``secrets`` appear in ``text`` (empty strings ignored)."""
    return [secret for secret in secrets if secret and secret in text]


#: Small flush thresholds: many files and checkpoints per run, so a kill lands between them often.
ARCHIVER_ARGS = ("archiver", "--flush-records", "400", "--flush-seconds", "1", "--batch-size", "250",
                 "--log-interval", "0.5", "--session-timeout", "6")
#: Even smaller for the SIGKILL test: ~1000 file + checkpoint PUT pairs per 100k records keep the
#: archiver busy for seconds, so seeded kill points land inside its work (often between the two PUTs).
ARCHIVER_KILL_ARGS = ("archiver", "--flush-records", "100", "--flush-seconds", "1", "--batch-size", "100",
                      "--log-interval", "0.5", "--session-timeout", "6")
#: Orders with every fault the generator knows, over two days (late records cross the day boundary).
FAULTY = Faults(duplicates=0.05, late=0.05, malformed=0.05, null_keys=0.05, headers=0.3)
START = "2026-11-20T12:00:00Z"


def produce_orders(settings: Settings, count: int, seed: int, *, start: str = START, days: float = 1.0,
                   partitions: int = 3, rate: float = 0.0, faults: Faults = FAULTY) -> ProduceSummary:
    """``count`` reference orders with faults, via the project's generator (deterministic per seed)."""
    return produce_events(settings, count, start=start, days=days, partitions=partitions, seed=seed,
                          faults=faults, rate=rate)


# ---------------------------------------------------------------- the pipeline, run like an operator runs it

DAY = "2026-11-20"
#: Live runs keep every window open (grace of ~3 years): nothing is late, so the live results must
#: equal the whole-day reference exactly, and every crash exercises the open-window state in S3.
LIVE_ARGS = ("processor", "-p", "orders", "-v", "2", "--start", "earliest", "--grace-seconds", "100000000",
             "--batch-size", "300", "--checkpoint-seconds", "0.5", "--progress", "log")
#: Small batches for the SIGKILL test: a checkpoint (every 0.5 s) then covers a small share of the work,
#: so progress-based kill points land between checkpoints, before the backlog is done.
LIVE_KILL_ARGS = ("processor", "-p", "orders", "-v", "2", "--start", "earliest", "--grace-seconds", "100000000",
                  "--batch-size", "20", "--checkpoint-seconds", "0.5", "--progress", "log")


def live_args(version: int, *extra: str, base: tuple[str, ...] = LIVE_ARGS) -> tuple[str, ...]:
    """``base`` (a live processor's flags) for another ``orders`` version, with ``extra`` flags."""
    at = base.index("-v") + 1
    return (*base[:at], str(version), *base[at + 1:], *extra)


#: What a processor logs when its static member was fenced by its own re-join and it joined again.
REJOIN_LINES = re.compile(r"fenced (this member|stage 1) .*rejoining")
#: What a processor logs when a broker restart cost it uncommitted work: a self-fence rejoin, its
#: session expired (partitions lost), a stage-1 transaction aborted and redone, or new clients for a
#: coordinator that did not answer.
RECOVERY_LINES = re.compile(rf"{REJOIN_LINES.pattern}|lost \(session expired\)|stage 1 transaction aborted|"
                            r"replacing the transactional producer|did not answer in time .*rejoining")


def rejoins(worker: Worker) -> tuple[int, int]:
    """(self-fence rejoins, all recoveries) of ``worker``, both counted in the figures."""
    output = worker.output()
    fenced, recovered = len(REJOIN_LINES.findall(output)), len(RECOVERY_LINES.findall(output))
    FIGURES.count("self_fence_rejoins", fenced)
    FIGURES.count("processor_recoveries", recovered)
    return fenced, recovered


def archive_all(workers: Workers, name: str = "archiver-final") -> Worker:
    """Run the archiver until it has archived everything in the topic now."""
    return workers.run(name, *ARCHIVER_ARGS, "--until-end", timeout=300)


def replay_spec(settings: Settings, version: int = 2, day: str = DAY) -> ReplaySpec:
    return ReplaySpec(pipeline="orders", version=version, day=day, source_topic=settings.events_topic,
                      bucket=settings.s3_bucket)


def load_args(spec: ReplaySpec) -> tuple[str, ...]:
    return ("replay", "load", "--day", spec.day, "--pipeline", spec.pipeline, "--version", str(spec.version))


def bounded_args(spec: ReplaySpec, batch_size: int = 300, *extra: str) -> tuple[str, ...]:
    """The bounded replay consumer with the reprocess job's flags (incl. its grace, read from the manifest)."""
    manifest = replay_manifest.read_manifest(s3_client(load_settings()), spec.bucket, spec.replay_id)
    grace_ms = replay_manifest.processor_grace_ms(manifest) if manifest else None
    grace = () if grace_ms is None else ("--grace-seconds", f"{grace_ms / 1000:g}")
    return ("processor", "-p", spec.pipeline, "-v", str(spec.version), "--topic", spec.topic, "--group", spec.group,
            "--from-beginning", "--until-end", "--dlq-topic", spec.dlq_topic, "--batch-size", str(batch_size),
            "--checkpoint-seconds", "0.5", "--progress", "log", *grace, *extra)


def wait_processor_caught_up(settings: Settings, client: Any, prefix: str, topic: str, timeout: float = 120,
                             worker: Worker | None = None) -> None:
    """Bounded wait until the processor's S3 checkpoints reach the topic's end offsets (a shuffled
    pipeline: stage 1's committed offsets reach them and stage 2's checkpoints the repartition topic's).
    On a timeout the message says where each stage stood, and ``worker``'s last lines."""
    ends = {p: o for p, o in end_offsets(settings, topic).items() if o > 0}
    seen: dict[str, object] = {}

    def checkpointed(states: dict[int, dict[str, Any]], targets: dict[int, int]) -> dict[int, int]:
        return {p: int(states.get(p, {}).get("next_offset") or -1) for p in targets}

    def caught_up() -> bool:
        states = list_states(client, settings.s3_bucket, prefix)
        shuffled = next((s for s in states.values() if "shuffle" in s), None)
        if shuffled is None:
            seen["checkpoints"] = checkpointed(states, ends)
            return all(seen["checkpoints"][p] >= o for p, o in ends.items())  # type: ignore[index]
        seen["stage 1 committed"] = group_committed(settings, shuffled["group"], topic, list(ends))
        internal = {p: o for p, o in end_offsets(settings, shuffled["topic"]).items() if o > 0}
        seen["stage 2 checkpoints"], seen["repartition ends"] = checkpointed(states, internal), internal
        return all(seen["stage 1 committed"][p] >= o for p, o in ends.items()) and all(  # type: ignore[index]
            seen["stage 2 checkpoints"][p] >= o for p, o in internal.items()  # type: ignore[index]
        )

    wait_until(caught_up, timeout, f"processor checkpoints to reach {ends}", detail=lambda: last_seen(seen, worker))


def last_seen(seen: dict[str, object], worker: Worker | None) -> str:
    """What a wait saw last, and ``worker``'s last lines: the explanation of a timed-out wait. A worker
    still running first prints its threads' stacks (SIGUSR1, see ``workers.cli.main``): where it waits."""
    if worker is None:
        return f"last seen {seen}"
    worker.dump_stacks()
    return f"last seen {seen}\n{worker.tail(80)}"


def group_committed(settings: Settings, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """``{partition: committed offset}`` of ``group`` on ``topic`` (-1001 where it has none): the offsets
    committed so far, not a wait for a killed member's pending transaction."""
    return committed_offsets(settings, group, topic, partitions, stable=False)


def archived_offsets(client: Any, bucket: str, topic: str) -> dict[int, int]:
    """``{partition: next_offset}`` from the archiver's S3 checkpoints (its durable resume points)."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"_state/archiver/{topic}/"):
        for obj in page.get("Contents", []):
            match = re.search(r"part=(\d+)\.json$", obj["Key"])
            if match:
                body = json.loads(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
                found[int(match.group(1))] = int(body["next_offset"])
    return found


def wait_archived(settings: Settings, client: Any, timeout: float = 120, worker: Worker | None = None) -> None:
    """Bounded wait until the archiver's checkpoints reach the events topic's current end offsets.
    On a timeout the message says where the checkpoints stood, and ``worker``'s last lines."""
    ends = {p: o for p, o in end_offsets(settings, settings.events_topic).items() if o > 0}
    seen: dict[str, object] = {}

    def archived() -> bool:
        seen["checkpoints"] = checkpoints = archived_offsets(client, settings.s3_bucket, settings.events_topic)
        return all(checkpoints.get(p, -1) >= o for p, o in ends.items())

    wait_until(archived, timeout, f"archiver checkpoints to reach {ends}", detail=lambda: last_seen(seen, worker))


#: What a worker logs while Kafka is unreachable: librdkafka's own log lines (connection errors; a session that
#: timed out without the coordinator answering, sometimes the only line of a 5 s outage), the workers' warnings.
KAFKA_DOWN_LINES = re.compile(r"Connection refused|Disconnected|brokers are down|_TRANSPORT|ALL_BROKERS_DOWN|"
                              r"consumer error|without a successful response from the group coordinator",
                              re.IGNORECASE)
#: What a worker logs when an S3 call fails (the archiver's and the processor's retry warnings).
S3_DOWN_LINES = re.compile(r"\bS3\b.*\bfailed\b")


@dataclass
class Outage:
    """One stop/start of a private-stack service that landed on a worker mid-stream."""

    kind: str
    downtime_s: float
    done: int
    total: int
    errors: int
    log: str


def outage(stack: Stack, service: str, seconds: float, kind: str, worker: Worker,
           errors: re.Pattern[str], progress: ProgressFn | None = None) -> Outage:
    """Stop one service of the private stack for ``seconds`` while ``worker`` runs, start it again.

    Asserts the fault landed: the worker was alive when the service stopped and still is; with
    ``progress``, it had done some but not all of its work just before the stop (mid-stream); and
    it logged at least one ``errors`` line while the service was down (it saw the outage).
    """
    def stop() -> None:
        assert stack.down([service]) == [service], f"{service} was not running"

    return _fault(stop, lambda: stack.up([service]), service, seconds, kind, worker, errors, progress)


def freeze(stack: Stack, service: str, seconds: float, kind: str, worker: Worker,
           errors: re.Pattern[str], progress: ProgressFn | None = None) -> Outage:
    """SIGSTOP one service of the private stack for ``seconds`` while ``worker`` runs, then SIGCONT.

    Unlike a stop, a frozen broker keeps its connections open and answers nothing: requests wait
    out their timeouts instead of failing at once. Asserts the fault landed as :func:`outage` does.
    """
    pid = read_pid(stack.layout, service)
    assert pid is not None, f"{service} was not running"
    return _fault(lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT),
                  service, seconds, kind, worker, errors, progress)


def _fault(stop: Callable[[], None], start: Callable[[], None], service: str, seconds: float, kind: str,
           worker: Worker, errors: re.Pattern[str], progress: ProgressFn | None) -> Outage:
    done, total = read_progress(progress) if progress else (0, 0)
    if progress:
        assert 0 < done < total, f"{worker.name} was not mid-stream when {service} stopped ({done}/{total})"
    assert worker.alive(), f"{worker.name} exited before {service} stopped:\n{worker.tail()}"
    mark = len(worker.output())
    started = time.monotonic()
    stop()
    print(f"[reliability] {kind}: {service} stopped for {seconds}s")
    try:
        time.sleep(seconds)
        seen = worker.output()[mark:]
    finally:
        start()
    downtime = time.monotonic() - started
    assert worker.alive(), f"{worker.name} died while {service} was down:\n{worker.tail()}"
    lines = [line for line in seen.splitlines() if errors.search(line)]
    assert lines, f"{worker.name} logged no error while {service} was down: the outage did not reach it\n{seen[-2000:]}"
    stream = {"done": done, "total": total} if progress else {}
    FIGURES.fault(kind, service=service, downtime_s=round(downtime, 1), errors=len(lines), **stream)
    return Outage(kind, downtime, done, total, len(lines), seen)


def drain_live(workers: Workers, settings: Settings, client: Any, name: str = "live-final") -> Worker:
    """Start one live processor, let it catch up with the topic, stop it with SIGTERM (must exit 0).

    A few fresh records are produced first so the member has work and has installed its signal
    handlers (it logs progress) before it is asked to stop.
    """
    produce_orders(settings, 300, 7)
    final = workers.start(name, *LIVE_ARGS)
    wait_until(lambda: "records=" in final.output() or not final.alive(), 120, f"{name} to start consuming")
    prefix = keys.live_prefix("orders", 2)
    wait_processor_caught_up(settings, client, prefix, settings.events_topic, timeout=180, worker=final)
    final.signal(signal.SIGTERM)
    assert final.wait(90) == 0, f"{name} did not stop cleanly:\n{final.tail()}"
    return final
