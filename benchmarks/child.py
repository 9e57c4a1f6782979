"""Run one of our components in this process and print one JSON line with its timing and peak RSS.

``python -m benchmarks.child <archiver|loader|processor> '<json options>'``

Imports happen before the clock starts (the Java tools' JVM start is not in their figures either);
the timed part is exactly one call of the component's public function, as its CLI makes it.
Polars' thread pool is sized as the command's (``workers.polars_pool``).
``peak_rss_bytes`` is the process's own ``ru_maxrss`` (imports included, never sampled away).
"""

# ruff: noqa: E402  (polars_pool.size_for must run before the imports after it)
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from typing import Any

from workers import polars_pool

# the component's process sized as its `kappa` command sizes it, before anything imports polars
polars_pool.size_for(sys.argv)

from workers.config import Settings, load_settings
from workers.processor.progress import Progress


def _settings(options: dict[str, Any]) -> Settings:
    """Settings from the environment, with the bench bucket and topic (never the shared ones)."""
    if options.get("bucket"):
        os.environ["KAPPA_S3_BUCKET"] = options["bucket"]
    if options.get("events_topic"):
        os.environ["KAPPA_EVENTS_TOPIC"] = options["events_topic"]
    return load_settings()


def run_archiver(options: dict[str, Any]) -> dict[str, Any]:
    from workers.archive.archiver import ArchiverOptions
    from workers.archive.archiver import run_archiver as run

    settings = _settings(options)
    opts = ArchiverOptions(group=options["group"], topic=options["topic"], until_end=True, log_interval=5.0)
    started = time.perf_counter()
    summary = run(settings, opts, threading.Event())
    seconds = time.perf_counter() - started
    return {"records": summary.records, "seconds": seconds, "files": summary.files,
            "bytes_written": summary.bytes_written}


def run_consume_loop(options: dict[str, Any]) -> dict[str, Any]:
    """A bare confluent-kafka ``consume()`` loop that does nothing with the records, with the consumer
    settings of ``like`` (``archiver``, the default, or ``processor``): the most a Python consumer on
    this client gets, timed like ours (group join in)."""
    from confluent_kafka import Consumer

    from workers import kafka as kafka_helpers
    from workers.archive.archiver import QUEUE_KBYTES
    from workers.processor.engine import READ_TUNING

    settings = _settings(options)
    records, seen = int(options["records"]), 0
    like = {"archiver": {**kafka_helpers.BULK_CONSUMER_TUNING, "queued.max.messages.kbytes": QUEUE_KBYTES},
            "processor": READ_TUNING}
    started = time.perf_counter()
    consumer = Consumer(settings.kafka_config(**{
        **like[options.get("like", "archiver")], "group.id": options["group"], "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }))
    consumer.subscribe([options["topic"]])
    try:
        while seen < records and time.perf_counter() - started < 300:
            seen += sum(1 for m in consumer.consume(num_messages=10_000, timeout=0.5) if m.error() is None)
    finally:
        consumer.close()
    if seen < records:
        raise RuntimeError(f"consume loop: {seen} of {records} records of {options['topic']} within 300 s")
    return {"records": seen, "seconds": time.perf_counter() - started}


def run_loader(options: dict[str, Any]) -> dict[str, Any]:
    from workers.replay import loader as replay_loader
    from workers.replay import manifest as replay_manifest

    settings = _settings(options)
    spec = replay_loader.ReplaySpec(
        pipeline=options.get("pipeline", "orders"), version=int(options.get("version", 2)), day=options["day"],
        source_topic=options["topic"], bucket=settings.s3_bucket, partitions=int(options.get("partitions", 3)),
        group_prefix=settings.group_prefix,
    )
    phases: dict[str, float] = {}

    def progress(p: replay_loader.LoadProgress) -> None:
        phases[p.phase] = p.elapsed_s
        print(f"loader {p.describe()}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = replay_loader.load(settings, spec, force=True, progress=progress, progress_interval=5.0)
    seconds = time.perf_counter() - started
    manifest = result.manifest
    return {"records": manifest.records, "seconds": seconds, "replay_topic": spec.topic, "group": spec.group,
            "produce_seconds": phases.get("produce"), "replay_id": spec.replay_id,
            "grace_ms": replay_manifest.processor_grace_ms(manifest)}


def run_processor(options: dict[str, Any]) -> dict[str, Any]:
    """``kappa processor --pipeline P --version V --topic T --group G --from-beginning --until-end``.

    ``grace_ms`` as the Dagster job passes it (``replay_manifest.processor_grace_ms`` of the manifest;
    None = infinite, for topics not known to be in event-time order). ``live: true`` runs the live
    path instead (unbounded, the live grace) and stops it once ``records`` records went through.
    ``kwargs``: extra ``run_processor`` keyword arguments of a scenario variant (data-driven).
    """
    from workers.processor import engine as processor

    settings = _settings(options)
    live = bool(options.get("live"))
    stop = threading.Event()
    extra: dict[str, Any] = dict(options.get("kwargs") or {})
    if live:
        extra.update(stop=stop, progress=StopAfter(int(options["records"]), stop),
                     grace_ms=options.get("grace_ms") or processor.LIVE_GRACE_MS)
    else:
        extra["grace_ms"] = options.get("grace_ms")
    started = time.perf_counter()
    summary = processor.run_processor(
        settings, options.get("pipeline", "orders"), int(options.get("version", 2)), topic=options["topic"],
        group=options["group"], bounded=not live, start="earliest", **extra,
    )
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"records": summary.records, "seconds": seconds,
                              "complete": summary.complete or (live and summary.records >= int(options["records"])),
                              "dlq_records": summary.dlq_records, "reports": summary.reports}
    if options.get("dump_report"):
        result["windows"] = _report_rows(settings, summary.reports)
    return result


class StopAfter(Progress):
    """Progress lines every 5 s, and ``stop`` set once ``records`` were processed (a live run never ends)."""

    def __init__(self, records: int, stop: threading.Event) -> None:
        super().__init__(interval=5.0, label="processor live")
        self.records, self.stop = records, stop

    def update(self, records: int, lag: int | None, late: int = 0, force: bool = False) -> None:
        super().update(records, lag, late, force)
        if records >= self.records:
            self.stop.set()


def _report_rows(settings: Settings, reports: dict[str, str]) -> list[list[Any]]:
    """``[[window_start_ms, type, events, amount], ...]`` of every report the run wrote."""
    import io

    import polars as pl

    from workers import s3 as s3_helpers

    client = s3_helpers.s3_client(settings)
    rows: list[list[Any]] = []
    for key in reports.values():
        body = s3_helpers.get_bytes(client, settings.s3_bucket, key)
        frame = pl.read_parquet(io.BytesIO(body or b""))
        frame = frame.with_columns(pl.col("window_start").dt.epoch("ms"))
        rows.extend(list(row) for row in frame.select("window_start", "type", "events", "amount").iter_rows())
    return rows


COMPONENTS = {"archiver": run_archiver, "consume-loop": run_consume_loop, "loader": run_loader,
              "processor": run_processor}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    component, options = sys.argv[1], json.loads(sys.argv[2])
    result = COMPONENTS[component](options)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["rate"] = result["records"] / result["seconds"] if result.get("records") else None
    print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
