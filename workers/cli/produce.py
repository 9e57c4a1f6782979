"""`kappa produce`: write reference `orders` events (with chosen faults) to the events topic."""

from __future__ import annotations

from enum import StrEnum

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from workers.cli.common import check_kafka, topic_name
from workers.config import load_settings
from workers.dev.generator import Faults, ProduceSummary, check_options, parse_start, produce_events

console = Console(stderr=True)


class Keying(StrEnum):
    user = "user"
    none = "none"
    random = "random"
    event_id = "event-id"


class RateColumn(ProgressColumn):
    """Records per second, as measured by rich over the last updates."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} rec/s", style="cyan")


def produce(
    count: int = typer.Option(10_000, "--count", "-n", help="Records to produce (faults included)."),
    rate: float = typer.Option(0, help="Records per second; 0 = as fast as possible."),
    start: str = typer.Option(None, help="Event time of the first record: ISO datetime or day (UTC if no zone). "
                                         "Default: now minus --days."),
    days: float = typer.Option(1.0, help="Span of event time covered by the records, in days."),
    partitions: int = typer.Option(6, help="Partitions if the topic has to be created."),
    seed: int = typer.Option(None, help="Random seed: the same seed (and --start) gives the same records."),
    duplicates: float = typer.Option(0.0, help="Share of records re-sent as exact duplicates."),
    late: float = typer.Option(0.0, help="Share of records minutes to hours behind the stream."),
    malformed: float = typer.Option(0.0, help="Share of malformed values (bad JSON/UTF-8, bad fields, tombstones)."),
    null_keys: float = typer.Option(0.02, help="Share of records with a null key."),
    headers: float = typer.Option(0.3, help="Share of records carrying headers (`source`, sometimes `trace`)."),
    users: int = typer.Option(1000, help="Distinct user ids (the record key)."),
    keying: Keying = typer.Option(Keying.user, help="Record key: user (user_id), none (null keys, librdkafka's "
                                  "default partitioner), random, event-id. Values are the same for any keying."),
    rerouted: float = typer.Option(0.0, "--rerouted-duplicates", help="Share of the duplicates re-sent through "
                                   "another path (another key, so usually another partition)."),
    topic: str = typer.Option(None, callback=topic_name, help="Topic to write to (default: KAPPA_EVENTS_TOPIC)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Produce `orders` events (keyed by user_id unless --keying), with Kafka timestamp = event time."""
    settings = load_settings()
    faults = Faults(
        duplicates=duplicates, late=late, malformed=malformed, null_keys=null_keys, headers=headers, rerouted=rerouted
    )
    faults.validate()
    check_options(count, days, partitions, rate)
    start_ms = parse_start(start, days)  # validated before the broker check and the progress bar
    check_kafka(settings)
    columns = (TextColumn("[bold]produce"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=quiet) as bar:
        task = bar.add_task("produce", total=count)
        summary = produce_events(
            settings, count, topic=topic, start=start_ms, days=days, partitions=partitions, seed=seed,
            faults=faults, rate=rate, users=users, keying=keying.value, progress=lambda n: bar.advance(task, n),
        )
    print_summary(summary)


def print_summary(summary: ProduceSummary) -> None:
    table = Table(title=f"produced to {summary.topic} ({summary.partitions} partitions)", show_header=False)
    table.add_row("records", f"{summary.count:,} in {summary.seconds:.1f}s "
                             f"({summary.count / max(summary.seconds, 1e-9):,.0f} rec/s)")
    for kind, number in sorted(summary.kinds.items()):
        table.add_row(kind, f"{number:,}")
    table.add_row("null keys", f"{summary.null_keys:,}")
    table.add_row("with headers", f"{summary.with_headers:,}")
    table.add_row("seed", f"{summary.seed} (--seed {summary.seed} with the same --start reproduces this run)")
    table.add_row("days", ", ".join(summary.days()) or "-")
    Console().print(table)
