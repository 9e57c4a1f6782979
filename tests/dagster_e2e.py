"""Helpers for end-to-end Dagster tests: run jobs via the CLI, read what they wrote and recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from confluent_kafka import Producer
from dagster_env import ROOT, dagster_cli

from workers import kafka as kafka_helpers
from workers import keys
from workers import s3 as s3_helpers
from workers.archive import format as archive_format
from workers.config import Settings
from workers.processor import state as processor_state
from workers.processor.engine import LIVE_GRACE_MS, run_processor
from workers.processor.results import corrected_report
from workers.replay.manifest import ReplayManifest

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def reprocess(
    day: str, tags: dict[str, str] | None = None, timeout: float = 240, config: Path | None = None
) -> subprocess.CompletedProcess:
    """``dagster job execute -m kappa_dagster -j reprocess --tags '{"dagster/partition": day, ...}'``."""
    return _execute({"dagster/partition": day, **(tags or {})}, timeout, config)


def reprocess_range(
    first: str, last: str, tags: dict[str, str] | None = None, timeout: float = 300, config: Path | None = None
) -> subprocess.CompletedProcess:
    """The run a single-run backfill launches: ``reprocess`` over the partition range first..last."""
    return _execute({RANGE_START: first, RANGE_END: last, **(tags or {})}, timeout, config)


def _execute(tags: dict[str, str], timeout: float, config: Path | None) -> subprocess.CompletedProcess:
    options = ["-c", str(config)] if config is not None else []
    return dagster_cli(
        "job", "execute", "-m", "kappa_dagster", "-j", "reprocess", *options, "--tags", json.dumps(tags),
        timeout=timeout,
    )


def report(s3: Any, settings: Settings, version: int, day: str) -> pl.DataFrame:
    found = corrected_report(s3, settings.s3_bucket, "orders", version, day)
    assert found is not None, f"no corrected report of orders v{version} for {day}"
    return found.frame


def archive(s3: Any, settings: Settings, day: str) -> pl.DataFrame:
    return archive_format.read_day(s3, settings.s3_bucket, settings.events_topic, day)


def object_keys(s3: Any, settings: Settings, prefix: str = "") -> list[str]:
    return [obj["Key"] for obj in s3_helpers.iter_keys(s3, settings.s3_bucket, prefix)]


def check_results(instance: dg.DagsterInstance, run_id: str) -> dict[str, bool]:
    """Asset check name -> passed, for one run."""
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data.passed for e in events}


def day_check_results(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict[str, bool]]:
    """Day -> asset check name -> passed, for one run (a range run has a verdict per day)."""
    found: dict[str, dict[str, bool]] = {}
    for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        data = event.dagster_event.event_specific_data
        found.setdefault(data.partition, {})[data.check_name] = data.passed
    return found


def latest_run(instance: dg.DagsterInstance, day: str) -> dg.DagsterRun:
    (run,) = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": day}), limit=1)
    return run


def materialization_metadata(instance: dg.DagsterInstance, asset: str, day: str) -> dict[str, Any]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[day]), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def produce_records(settings: Settings, topic: str, frame: pl.DataFrame) -> None:
    """Put archive rows back into a live topic (same partition, key, value, headers, timestamp)."""
    producer = Producer(settings.kafka_config(**{"linger.ms": 20}))
    for row in frame.sort("partition", "offset").iter_rows(named=True):
        headers = [(h["key"], h["value"]) for h in row["headers"]]
        producer.produce(
            topic,
            key=row["key"],
            value=row["value"],
            headers=headers,
            partition=row["partition"],
            timestamp=int(row["timestamp"].timestamp() * 1000),
        )
        producer.poll(0)
    assert producer.flush(60) == 0


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def start_processor(*args: str) -> subprocess.Popen:
    """The live worker entry point, as a child we own (stopped by pid with SIGTERM)."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "processor", *args, "--progress", "none"],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        process.wait(60)


def pids_running(needle: str) -> list[int]:
    """Pids whose command line contains ``needle`` (a unique consumer group name)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmdline and "workers.cli processor" in cmdline:
                pids.append(int(entry.name))
    return pids


def publish_replay(
    settings: Settings, s3: Any, version: int, day: str, partitions: int | None = None, force: bool = False
) -> ReplayManifest:
    """A day's corrected report the way the Dagster job makes it, without Dagster: load the archive into
    a replay topic, run the bounded processor over it, then the gate (reference check, publish)."""
    from workers.replay import loader as replay_loader
    from workers.reports import gate as report_gate

    spec = replay_loader.ReplaySpec("orders", version, day, settings.events_topic, settings.s3_bucket, partitions)
    manifest = replay_loader.load(settings, spec, client=s3, force=force).manifest
    summary = run_processor(
        settings, "orders", version, topic=manifest.replay_topic, group=manifest.group, bounded=True,
        start="earliest", grace_ms=None, dlq_topic=manifest.dlq_topic,
    )
    manifest = report_gate.mark_consumed(s3, settings.s3_bucket, manifest, summary.to_dict())
    verdict = report_gate.evaluate(s3, settings.s3_bucket, manifest)
    manifest = report_gate.publish(s3, settings.s3_bucket, manifest, verdict)
    assert manifest.status == "reported", manifest.failed_checks
    return manifest


def run_live_v1_until_caught_up(settings: Settings, s3: Any, grace_ms: int = LIVE_GRACE_MS) -> None:
    """Live orders v1 in a thread over the events topic, stopped once its checkpoints reach today's end."""
    end = kafka_helpers.end_offsets(settings, settings.events_topic)
    prefix = keys.live_prefix("orders", 1)

    def caught_up() -> bool:
        states = processor_state.list_states(s3, settings.s3_bucket, prefix)
        return all(states.get(p, {}).get("next_offset") == o for p, o in end.items() if o)

    stop = threading.Event()
    kwargs = {"start": "earliest", "checkpoint_seconds": 0.5, "stop": stop, "grace_ms": grace_ms}
    live = threading.Thread(target=run_processor, args=(settings, "orders", 1), kwargs=kwargs)
    live.start()
    try:
        deadline = time.monotonic() + 60
        while not caught_up():
            assert time.monotonic() < deadline, "live v1 did not catch up"
            time.sleep(0.5)
    finally:
        stop.set()
        live.join(60)
