"""Run one of our components in this process and print one JSON line with its timing and peak RSS.

``python -m benchmarks.child <archiver|loader|processor> '<json options>'``

Imports happen before the clock starts (the Java tools' JVM start is not in their figures either);
the timed part is exactly one call of the component's public function, as its CLI makes it.
``peak_rss_bytes`` is the process's own ``ru_maxrss`` (imports included, never sampled away).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from typing import Any

from workers.config import Settings, load_settings


def _settings(options: dict[str, Any]) -> Settings:
    """Settings from the environment, with the bench bucket and topic (never the shared ones)."""
    if options.get("bucket"):
        os.environ["KAPPA_S3_BUCKET"] = options["bucket"]
    if options.get("events_topic"):
        os.environ["KAPPA_EVENTS_TOPIC"] = options["events_topic"]
    return load_settings()


def run_archiver(options: dict[str, Any]) -> dict[str, Any]:
    from workers.archiver import ArchiverOptions
    from workers.archiver import run_archiver as run

    settings = _settings(options)
    opts = ArchiverOptions(group=options["group"], topic=options["topic"], until_end=True, log_interval=5.0)
    started = time.perf_counter()
    summary = run(settings, opts, threading.Event())
    seconds = time.perf_counter() - started
    return {"records": summary.records, "seconds": seconds, "files": summary.files,
            "bytes_written": summary.bytes_written}


def run_loader(options: dict[str, Any]) -> dict[str, Any]:
    from workers import replay_loader

    settings = _settings(options)
    spec = replay_loader.ReplaySpec(
        pipeline=options.get("pipeline", "orders"), version=int(options.get("version", 2)), day=options["day"],
        source_topic=options["topic"], bucket=settings.s3_bucket, partitions=int(options.get("partitions", 3)),
    )
    phases: dict[str, float] = {}

    def progress(p: replay_loader.Progress) -> None:
        phases[p.phase] = p.elapsed_s
        print(f"loader {p.describe()}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = replay_loader.load(settings, spec, force=True, progress=progress, progress_interval=5.0)
    seconds = time.perf_counter() - started
    manifest = result.manifest
    return {"records": manifest["records"], "seconds": seconds, "replay_topic": spec.topic, "group": spec.group,
            "produce_seconds": phases.get("produce"), "replay_id": spec.replay_id}


def run_processor(options: dict[str, Any]) -> dict[str, Any]:
    from workers import processor

    settings = _settings(options)
    started = time.perf_counter()
    result = processor.run_processor(
        settings,
        **processor_kwargs(options),
    )
    seconds = time.perf_counter() - started
    records = _records_of(result)
    return {"records": records, "seconds": seconds, "result": _jsonable(result)}


def processor_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """Map our options to run_processor's keyword arguments (the processor's signature, read at run time)."""
    import inspect

    from workers import processor

    params = inspect.signature(processor.run_processor).parameters
    wanted = {
        "pipeline": options.get("pipeline", "orders"), "version": int(options.get("version", 2)),
        "topic": options["topic"], "group": options["group"], "from_beginning": True, "until_end": True,
    }
    kwargs = {k: v for k, v in wanted.items() if k in params}
    if "options" in params and len(kwargs) < len(wanted):
        options_type = params["options"].annotation
        cls = getattr(processor, options_type, None) if isinstance(options_type, str) else options_type
        if cls is not None:
            fields = inspect.signature(cls).parameters
            kwargs = {k: v for k, v in kwargs.items() if k not in fields}
            kwargs["options"] = cls(**{k: v for k, v in wanted.items() if k in fields})
    return kwargs


def _records_of(result: Any) -> int | None:
    for attr in ("records", "consumed"):
        value = getattr(result, attr, None)
        if value is None and isinstance(result, dict):
            value = result.get(attr)
        if isinstance(value, int):
            return value
    stats = getattr(result, "stats", None)
    if isinstance(stats, dict) and isinstance(stats.get("records"), int):
        return stats["records"]
    return None


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if hasattr(value, "__dict__"):
            return {k: _jsonable(v) for k, v in vars(value).items() if not k.startswith("_")}
        return repr(value)


COMPONENTS = {"archiver": run_archiver, "loader": run_loader, "processor": run_processor}


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
