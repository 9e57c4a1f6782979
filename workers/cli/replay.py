"""`kappa replay load`: load one day of the raw archive into its replay topic (what Dagster's replay_load runs)."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from workers import replay_loader
from workers.config import load_settings

app = typer.Typer(help="Replay history from the S3 archive through Kafka.", no_args_is_help=True)
console = Console()


@app.command()
def load(
    day: str = typer.Option(..., "--day", help="The archive day to replay, YYYY-MM-DD (UTC)."),
    pipeline: str = typer.Option("orders", help="Pipeline the replay is for (names the topic and group)."),
    version: int = typer.Option(2, help="Pipeline version the replay is for."),
    partitions: int = typer.Option(
        None, help="Partitions of the replay topic, records spread by key (default: mirror the source partitions)."
    ),
    throttle: float = typer.Option(None, help="Max records/s (default: as fast as possible)."),
    force: bool = typer.Option(False, "--force", help="Reload even if an identical load exists."),
) -> None:
    """Publish a day's archive, deduplicated and in event-time order, to events.replay.<replay id>."""
    settings = load_settings()
    spec = replay_loader.ReplaySpec(
        pipeline=pipeline,
        version=version,
        day=day,
        source_topic=settings.events_topic,
        bucket=settings.s3_bucket,
        partitions=partitions,
        throttle=throttle,
    )
    console.print(f"replay {spec.replay_id}: s3://{spec.bucket}/raw/{spec.source_topic}/dt={day}/ -> {spec.topic}")
    result = replay_loader.load(
        settings, spec, force=force, progress=lambda p: console.print(f"[dim]{p.describe()}[/]", highlight=False)
    )
    manifest = result.manifest
    verb = f"[yellow]skipped[/] ({result.reason})" if result.skipped else "[green]loaded[/]"
    console.print(
        f"{verb}: {manifest.get('records')} records ({manifest.get('duplicates_dropped')} duplicates dropped), "
        f"group {manifest['group']}"
    )
    summary = {"replay_id": spec.replay_id, "topic": spec.topic, "end_offsets": manifest["end_offsets"]}
    typer.echo(json.dumps(summary))  # one machine-readable line, never wrapped
