"""`kappa replay load`: load one day of the raw archive into its replay topic (what Dagster's replay_load runs)."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from workers import s3 as s3_helpers
from workers.config import load_settings
from workers.replay import lease as replay_lease
from workers.replay import loader as replay_loader

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
    run: str = typer.Option(
        None, help="Run token (a-z0-9, up to 12): names its own topic and group; default: the slot's stable names."
    ),
    wait: float = typer.Option(0.0, help="Seconds to wait when another run is replaying the same day."),
    lease_seconds: float = typer.Option(
        replay_lease.DEFAULT_TTL_S, help="Hold on the day, renewed while loading; expires if this process dies."
    ),
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
        run=run,
    )
    console.print(f"replay {spec.replay_id}: s3://{spec.bucket}/raw/{spec.source_topic}/dt={day}/ -> {spec.topic}")
    client = s3_helpers.s3_client(settings)
    what = f"the replay of {pipeline} v{version} for {day}"
    lease = replay_lease.acquire(
        client, spec.bucket, spec.slot, replay_lease.default_owner(), what=what, ttl_s=lease_seconds, wait_s=wait
    )
    try:
        with lease.kept_alive():
            result = replay_loader.load(
                settings,
                spec,
                client=client,
                force=force,
                progress=lambda p: console.print(f"[dim]{p.describe()}[/]", highlight=False),
                lost=lease.lost,
            )
    finally:
        lease.release()
    manifest = result.manifest
    verb = f"[yellow]skipped[/] ({result.reason})" if result.skipped else "[green]loaded[/]"
    console.print(
        f"{verb}: {manifest.records} records ({manifest.duplicates_dropped} duplicates dropped), "
        f"group {manifest.group}"
    )
    summary = {"replay_id": manifest.replay_id, "topic": manifest.replay_topic}
    summary["end_offsets"] = manifest.end_offsets
    typer.echo(json.dumps(summary))  # one machine-readable line, never wrapped
