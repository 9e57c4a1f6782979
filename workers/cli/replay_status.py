"""`kappa replay status`: one row per replay (days, group lag, rate, ETA, state) from offsets only."""

from __future__ import annotations

import time

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from workers import s3 as s3_helpers
from workers.cli.common import kafka_settings
from workers.errors import KappaError
from workers.lag import LagReader
from workers.replay import status as status_lib

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 120)  # logs and pipes get the whole table, not ellipses


def status(
    sample: float = typer.Option(2.0, help="Seconds between the two offset readings that give the rate (0 = no rate)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every --sample seconds until Ctrl-C."),
) -> None:
    """Show every replay of the bucket: loaded records, replay-group lag, rate, ETA and state."""
    if sample < 0 or (watch and sample == 0):
        raise KappaError("--sample must be > 0 seconds (and >= 0 without --watch)")
    settings = kafka_settings()
    client, reader, rates = s3_helpers.s3_client(settings), LagReader(settings), status_lib.RateTracker()
    rows = status_lib.replay_rows(settings, reader, rates, client)
    if not rows:
        console.print(f"no replays in s3://{settings.s3_bucket}/_state/replays/ yet (run `kappa replay load`)")
        return
    while True:
        if sample:
            time.sleep(sample)
            rows = status_lib.replay_rows(settings, reader, rates, client)
        console.print(table(rows))
        if not watch:
            return


def table(rows: list[status_lib.ReplayRow]) -> Table:
    """Compact enough for 80 columns: the replay id already names pipeline, version and day."""
    out = Table(title="replays", box=box.SIMPLE_HEAD, pad_edge=False)
    out.add_column("replay id", no_wrap=True)
    out.add_column("day", no_wrap=True)
    for column in ("done", "group lag", "rate", "ETA"):
        out.add_column(column, justify="right", no_wrap=True)
    out.add_column("state", no_wrap=True)
    for row in rows:
        rate = "-" if row.rate is None else f"{row.rate:,.0f}/s"
        done = f"{row.consumed:,}/{row.total:,} {row.percent:.0f}%"
        out.add_row(row.replay_id, row.day, done, f"{row.lag:,}", rate, status_lib.format_eta(row.eta_s), row.state)
    return out
