"""`kappa archive compact`: rewrite a closed day's small archive files into large ones (what Dagster's
``archive_compaction`` asset runs), then delete files replaced longer than the grace period ago."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from workers import keys
from workers.archive import compaction
from workers.config import load_settings
from workers.errors import KappaError

app = typer.Typer(help="Maintain the raw S3 archive.", no_args_is_help=True)


@app.command()
def compact(
    day: str = typer.Option(..., "--day", help="The closed archive day to compact, YYYY-MM-DD (UTC)."),
    target_rows: int = typer.Option(compaction.DEFAULT_TARGET_ROWS, help="Records per compacted file, at most."),
    grace: float = typer.Option(
        compaction.DEFAULT_GRACE_S, help="Seconds replaced files stay readable after the switch."
    ),
    close_after: float = typer.Option(
        compaction.DEFAULT_CLOSE_AFTER_S, help="Seconds after the end of the day before it counts as closed."
    ),
) -> None:
    """Compact one closed day: same records byte for byte, verified before one atomic pointer switch."""
    keys.valid_day(day)
    if grace < 0 or close_after < 0:
        raise KappaError("--grace and --close-after must be >= 0 seconds")
    result = compaction.compact_day(
        load_settings(), day, target_rows=target_rows, grace_s=grace, close_after_s=close_after
    )
    typer.echo(json.dumps(asdict(result)))
