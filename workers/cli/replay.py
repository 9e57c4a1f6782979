"""`kappa replay load` / `consume`: load days of the raw archive into a replay topic (what Dagster's replay_load
runs) and consume it with N processor members of its group (what replay_consume runs)."""

from __future__ import annotations

import datetime as dt
import json
import shlex

import typer
from rich.console import Console

from workers import keys
from workers import s3 as s3_helpers
from workers.cli.common import check_kafka, kafka_settings
from workers.config import load_settings
from workers.errors import KappaError
from workers.replay import consume as replay_consume
from workers.replay import lease as replay_lease
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest

app = typer.Typer(help="Replay history from the S3 archive through Kafka.", no_args_is_help=True)
console = Console()


@app.command()
def load(
    day: str = typer.Option(..., "--day", help="The archive day to replay, YYYY-MM-DD (UTC)."),
    last_day: str = typer.Option(
        None, help="Replay every day from --day to this one (inclusive) as ONE replay: one topic, one group."
    ),
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
        group_prefix=settings.group_prefix,
    )
    days = day_range(day, last_day)
    ranged = replay_loader.RangeSpec.of(spec, days) if len(days) > 1 else None
    check_kafka(settings)  # after the arguments: a mistake in them is reported even while the broker is down
    where = f"dt={day}" if ranged is None else f"dt={days[0]}..{days[-1]} ({len(days)} days)"
    console.print(f"replay {(ranged or spec).replay_id}: s3://{spec.bucket}/raw/{spec.source_topic}/{where} -> "
                  f"{(ranged or spec).topic}")
    client = s3_helpers.s3_client(settings)
    slots = {d.slot: f"the replay of {pipeline} v{version} for {d.day}" for d in (ranged.days if ranged else [spec])}
    lease = replay_lease.acquire_all(
        client, spec.bucket, slots, replay_lease.default_owner(), ttl_s=lease_seconds, wait_s=wait
    )
    options = {
        "client": client,
        "force": force,
        "progress": lambda p: console.print(f"[dim]{p.describe()}[/]", highlight=False),
        "lost": lease.lost,
    }
    try:
        with lease.kept_alive():
            if ranged is None:
                results = {day: replay_loader.load(settings, spec, **options)}
            else:
                results = replay_loader.load_range(settings, ranged, **options)
    finally:
        lease.release()
    for result in results.values():
        manifest = result.manifest
        verb = f"[yellow]skipped[/] ({result.reason})" if result.skipped else "[green]loaded[/]"
        console.print(
            f"{manifest.day}: {verb}: {manifest.records} records ({manifest.duplicates_dropped} duplicates dropped), "
            f"topic {manifest.replay_topic}, group {manifest.group}"
        )
    first = next(iter(results.values())).manifest
    summary = {"replay_id": first.range_id or first.replay_id, "topic": first.replay_topic}
    summary["end_offsets"] = first.end_offsets
    typer.echo(json.dumps(summary))  # one machine-readable line, never wrapped


@app.command()
def consume(
    day: str = typer.Option(..., "--day", help="The first (or only) replayed day, YYYY-MM-DD (UTC)."),
    last_day: str = typer.Option(None, help="The last day of a range loaded with --last-day."),
    pipeline: str = typer.Option("orders", help="Pipeline the replay is for."),
    version: int = typer.Option(2, help="Pipeline version the replay is for."),
    consumers: int = typer.Option(1, help="Processor processes in the replay group; partitions spread over them."),
    processor_args: str = typer.Option("", help="Extra `kappa processor` options, e.g. '--batch-size 2000'."),
) -> None:
    """Run the bounded processor over the loaded replay of these days as N members of its group.

    Every member stops once the group reached the replay's end offsets and the reports are written; the
    gate (Dagster's corrected_report) then checks and publishes each day.
    """
    replay_consume.valid_consumers(consumers)
    days = day_range(day, last_day)
    settings = kafka_settings()
    client = s3_helpers.s3_client(settings)
    groups: dict[str, replay_manifest.ReplayManifest] = {}
    for name in days:
        slot = replay_manifest.replay_id(pipeline, version, name, settings.s3_bucket, settings.events_topic)
        manifest = replay_manifest.read_manifest(client, settings.s3_bucket, slot)
        if manifest is None or manifest.status not in replay_manifest.LOADED_STATES:
            raise KappaError(f"{name} is not loaded (replay {slot}): run `kappa replay load --day {name}` first")
        groups.setdefault(str(manifest.group), manifest)
    for group, manifest in groups.items():
        command = replay_consume.processor_command(pipeline, version, manifest, shlex.split(processor_args))
        console.print(f"consuming {manifest.replay_topic} with {consumers} member(s) of {group}")
        members = replay_consume.start_members(command, consumers)
        try:
            replay_consume.wait_members(members)
        except BaseException:
            replay_consume.stop_members(members)
            raise
    console.print(f"[green]consumed[/] {len(groups)} replay(s); the reports are written, not yet checked")


def day_range(first: str, last: str | None) -> list[str]:
    """``first`` .. ``last`` inclusive (UTC days); one line naming the mistake when ``last`` is before ``first``."""
    start = dt.date.fromisoformat(keys.valid_day(first))
    end = start if last is None else dt.date.fromisoformat(keys.valid_day(last))  # '' is a mistake
    if end < start:
        raise KappaError(f"--last-day {last} is before --day {first}")
    return [(start + dt.timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]
