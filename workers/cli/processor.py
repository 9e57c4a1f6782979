"""`kappa processor`: run a pipeline version live, or bounded over a replay topic (see workers/processor/engine.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from workers import kafka as kafka_helpers
from workers.cli.common import group_name, topic_name
from workers.config import load_settings
from workers.errors import KappaError
from workers.processor.engine import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHECKPOINT_SECONDS,
    DEFAULT_SESSION_TIMEOUT_S,
    LIVE_GRACE_MS,
    RunSummary,
    run_processor,
)
from workers.processor.progress import make_progress

console = Console(stderr=True)


class StartAt(StrEnum):
    earliest = "earliest"
    latest = "latest"


class StageKind(StrEnum):
    both = "both"
    one = "1"
    two = "2"


class ProgressKind(StrEnum):
    auto = "auto"
    rich = "rich"
    log = "log"
    none = "none"


def parse_offsets(text: str | None, option: str) -> dict[int, int] | None:
    """``{"0": 120, "1": 98}`` -> ``{0: 120, 1: 98}``; anything else is one clear error."""
    if text is None:
        return None
    try:
        data = json.loads(text)
        offsets = {int(p): int(o) for p, o in data.items()}
    except (ValueError, TypeError, AttributeError):
        raise KappaError(f'{option} must be a JSON object of partition -> offset, e.g. {{"0": 120}}') from None
    if any(p < 0 or o < 0 for p, o in offsets.items()):
        raise KappaError(f"{option}: partitions and offsets must be >= 0")
    return offsets


def is_pipes_process() -> bool:
    import dagster_pipes

    check = getattr(dagster_pipes, "is_dagster_pipes_process", None)
    return check() if check else dagster_pipes.DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ


@contextlib.contextmanager
def pipes_context() -> Iterator[Any]:
    """The Dagster Pipes context when launched by Dagster (PipesSubprocessClient), else None."""
    if not is_pipes_process():
        yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield pipes


def print_summary(summary: RunSummary) -> None:
    table = Table(title=f"{summary.pipeline} v{summary.version} on {summary.topic}")
    for column in ("day", "records", "counted", "dlq", "duplicates", "late", "report"):
        table.add_column(column)
    for day, stats in summary.stats.items():
        table.add_row(
            day,
            *(f"{stats[k]:,}" for k in ("records", "counted", "dlq", "duplicates", "late")),
            summary.reports.get(day, "-"),
        )
    if summary.stats:
        console.print(table)
    console.print(
        f"processed {summary.records:,} records in {summary.seconds:.1f}s "
        f"(dlq {summary.dlq_records:,}, late {summary.late_records:,})"
    )


def processor(
    pipeline: str = typer.Option(..., "--pipeline", "-p", help="Pipeline name, e.g. orders."),
    version: int = typer.Option(..., "--version", "-v", help="Pipeline version, e.g. 2."),
    topic: str = typer.Option(None, callback=topic_name, help="Input topic (default: KAPPA_EVENTS_TOPIC)."),
    group: str = typer.Option(None, callback=group_name, help="Consumer group (default: "
                              "<KAPPA_GROUP_PREFIX>.<P>.v<V>.live, i.e. kappa.<P>.v<V>.live)."),
    start: StartAt = typer.Option(StartAt.latest, help="Where a partition without checkpoint starts."),
    start_offsets: str = typer.Option(
        None, help="JSON {partition: offset}; beats a checkpoint made from other start offsets."
    ),
    handoff: bool = typer.Option(
        False, "--handoff", help="Live: start at the promoted version's switch (see kappa promote)."
    ),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Same as --start earliest."),
    until_end: bool = typer.Option(False, "--until-end", help="Bounded: stop at the end offsets, write reports."),
    end_offsets: str = typer.Option(None, help="Bounded: JSON {partition: offset} to stop at (default: now)."),
    grace_seconds: float = typer.Option(
        None, help=f"Watermark grace (default {LIVE_GRACE_MS // 1000}s live, infinite with --until-end)."
    ),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, help="Records per consume() micro-batch."),
    checkpoint_seconds: float = typer.Option(DEFAULT_CHECKPOINT_SECONDS, help="Seconds between S3 checkpoints."),
    dlq_topic: str = typer.Option(None, callback=topic_name, help="Dead-letter topic (default: KAPPA_DLQ_TOPIC)."),
    late_topic: str = typer.Option(None, callback=topic_name,
                                   help="Topic for records later than grace (default: KAPPA_LATE_TOPIC)."),
    progress: ProgressKind = typer.Option(ProgressKind.auto, help="Progress display."),
    instance_id: str = typer.Option(None, help="Static group member id (env KAPPA_INSTANCE_ID; 'auto' = "
                                                "kappa-processor-<host>-<ordinal>; default 'none': dynamic member)."),
    group_protocol: str = typer.Option(None, help="Consumer group protocol: classic (default) or consumer "
                                                  "(KIP-848; env KAPPA_GROUP_PROTOCOL)."),
    session_timeout: float = typer.Option(DEFAULT_SESSION_TIMEOUT_S, help="Kafka group session timeout in seconds "
                                          "(6-300, classic protocol; see docs/ARCHITECTURE.md, Fast takeover)."),
    commit_timeout: float = typer.Option(kafka_helpers.COMMIT_LIMIT_S, help="Seconds a Kafka offset commit may "
                                         "take; a commit still waiting then means a stuck coordinator "
                                         "connection: the processor rejoins with a new consumer."),
    stage: StageKind = typer.Option(StageKind.both, help="Pipelines with a state key: run both shuffle stages, "
                                    "or only stage 1 (parse + repartition) or stage 2 (state + results)."),
    shuffle_partitions: int = typer.Option(None, help="Partitions of the repartition topic when it is created "
                                           "(default: the input topic's)."),
) -> None:
    """Run one pipeline version: live (until stopped) or bounded (--until-end) over a replay topic."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    settings = load_settings()  # run_processor checks the arguments, then the broker
    default_grace = None if until_end else LIVE_GRACE_MS
    grace_ms = default_grace if grace_seconds is None else int(grace_seconds * 1000)
    with pipes_context() as pipes:
        label = f"{pipeline} v{version}"
        bar = make_progress(progress.value, label, pipes.log.info if pipes is not None else None)
        summary = run_processor(
            settings,
            pipeline,
            version,
            topic=topic,
            group=group,
            bounded=until_end,
            start="earliest" if from_beginning else start.value,
            start_offsets=parse_offsets(start_offsets, "--start-offsets"),
            end_offsets=parse_offsets(end_offsets, "--end-offsets"),
            grace_ms=grace_ms,
            batch_size=batch_size,
            checkpoint_seconds=checkpoint_seconds,
            dlq_topic=dlq_topic,
            late_topic=late_topic,
            progress=bar,
            handoff=handoff,
            instance_id=instance_id,
            group_protocol=group_protocol,
            session_timeout=session_timeout,
            commit_timeout=commit_timeout,
            stage=stage.value,
            shuffle_partitions=shuffle_partitions,
            check_broker=True,
        )
        if pipes is not None:
            pipes.report_custom_message(summary.to_dict())
    print_summary(summary)
    if until_end and not summary.complete:
        console.print("[yellow]stopped before the end offsets; run the same command again to resume[/]")
        raise typer.Exit(130)
