"""`kappa promote` / `kappa rollback`: atomically switch which version's reports users read."""

from __future__ import annotations

import typer
from rich.console import Console

from workers import promote as promote_lib
from workers import s3 as s3_helpers
from workers.cli.common import kafka_settings
from workers.config import load_settings

console = Console()


def promote(
    pipeline: str = typer.Option("orders", help="Pipeline to promote."),
    version: int = typer.Option(..., help="Version whose corrected reports become CURRENT."),
    max_unexplained: int = typer.Option(
        0, help="Refuse when more (window, group) rows than this differ from what users read for no known cause."
    ),
) -> None:
    """Point reports/<P>/CURRENT at VERSION and print how to start its live processor without gap/overlap."""
    promote_lib.check_arguments(pipeline, version, max_unexplained)  # a mistake is reported even while Kafka is down
    settings = kafka_settings()
    client = s3_helpers.s3_client(settings)
    pointer = promote_lib.promote(
        client, settings.s3_bucket, settings.events_topic, pipeline, version, max_unexplained=max_unexplained,
        settings=settings,
    )
    console.print(
        f"[green]promoted[/] {pipeline} v{version}: reports/{pipeline}/CURRENT -> {pointer['reports_prefix']}"
    )
    console.print(f"days with corrected reports: {', '.join(pointer['days'])}")
    for line in pointer["diffs"].values():
        console.print(f"  diff {line}", highlight=False)
    if pointer["uncovered_days"]:
        console.print(f"[yellow]not replayed, below the start offsets:[/] {', '.join(pointer['uncovered_days'])}")
    console.print(f"live start offsets (every partition): {promote_lib.start_offsets_arg(pointer)}")
    console.print("start the new live processor with (stop any older one of this version first):")
    console.print(f"  kappa processor --pipeline {pipeline} --version {version} --handoff", highlight=False)


def rollback(pipeline: str = typer.Option("orders", help="Pipeline to roll back.")) -> None:
    """Restore the previous reports/<P>/CURRENT (or remove it after the first promotion)."""
    settings = load_settings()
    restored = promote_lib.rollback(s3_helpers.s3_client(settings), settings.s3_bucket, pipeline)
    where = f"v{restored['version']}" if restored else "the live results (CURRENT removed)"
    console.print(f"[green]rolled back[/] {pipeline} to {where}")
