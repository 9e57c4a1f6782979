"""`kappa report`: one day's corrected report, its live results (`--live`), or what users read (`--served`)."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from workers.config import load_settings
from workers.errors import KappaError
from workers.keys import valid_day
from workers.pipelines import get_pipeline
from workers.processor import results
from workers.processor.handoff import served_report
from workers.s3 import s3_client

console = Console()


class Format(StrEnum):
    table = "table"
    parquet = "parquet"
    csv = "csv"
    json = "json"


def render_table(frame: pl.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for name, dtype in frame.schema.items():
        table.add_column(name, justify="right" if dtype.is_numeric() else "left")
    for row in frame.iter_rows():
        table.add_row(*(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row))
    return table


def write(frame: pl.DataFrame, fmt: Format, output: Path | None) -> None:
    if fmt is Format.parquet:
        if output is None:
            raise KappaError("--format parquet needs --output PATH")
        frame.write_parquet(output)
    elif fmt is Format.csv:
        frame.write_csv(output or sys.stdout)
    else:
        text = frame.with_columns(pl.col("window_start").dt.to_string("%Y-%m-%dT%H:%M:%SZ")).write_json()
        if output is None:
            print(text)
        else:
            output.write_text(text)


def corrected_frame(client: Any, bucket: str, pipeline: str, version: int, day: str) -> pl.DataFrame:
    get_pipeline(pipeline, version)  # an unknown pipeline or version is a mistake, not a missing report
    found = results.corrected_report(client, bucket, pipeline, version, day)
    if found is None:
        raise KappaError(
            f"no corrected report of {pipeline} v{version} for {day} yet; make it with: dagster job execute -m "
            f"kappa_dagster -j reprocess --tags '{{\"dagster/partition\": \"{day}\", \"kappa/version\": "
            f"\"{version}\", \"kappa/pipeline\": \"{pipeline}\"}}' (or add --live for the live results)"
        )
    return found.frame


def report(
    pipeline: str = typer.Option(..., "--pipeline", "-p", help="Pipeline name, e.g. orders."),
    version: int = typer.Option(None, "--version", "-v", help="Pipeline version (not with --served)."),
    day: str = typer.Option(..., "--day", "-d", help="UTC day, YYYY-MM-DD."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="table, parquet, csv or json."),
    output: Path = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    live: bool = typer.Option(False, "--live", help="The live results instead of the corrected report."),
    include_open: bool = typer.Option(False, "--include-open", help="With --live: add windows that are still open."),
    served: bool = typer.Option(
        False, "--served", help="What users read: the promoted corrected report + its live part (handoff)."
    ),
) -> None:
    """The corrected report of one version and day; --live: its live results; --served: what users read."""
    settings = load_settings()
    client, bucket, day = s3_client(settings), settings.s3_bucket, valid_day(day)
    if served:
        version, frame = served_report(client, bucket, pipeline, day)
        title = f"{pipeline} v{version} served (corrected + live from the switch), {day}"
    elif version is None:
        raise KappaError("--version is required (or use --served)")
    elif include_open and not live:
        raise KappaError("--include-open is for the live results: add --live")
    elif live:
        frame = results.live_results(client, bucket, pipeline, version, day, include_open=include_open)
        title = f"{pipeline} v{version} live, {day}"
    else:
        frame = corrected_frame(client, bucket, pipeline, version, day)
        title = f"{pipeline} v{version} corrected, {day}"
    if fmt is Format.table and output is None:
        console.print(render_table(frame, f"{title} ({frame.height} rows)"))
    else:
        write(frame, Format.csv if fmt is Format.table else fmt, output)
