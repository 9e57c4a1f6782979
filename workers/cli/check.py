"""`kappa check`: show the effective configuration (secrets redacted) and prove Kafka and S3 answer."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import load_settings
from workers.errors import KappaError

console = Console()


def check(timeout: float = typer.Option(10, help="Seconds to wait for each service.")) -> None:
    """Print the configuration in use and check that Kafka and S3 answer."""
    if timeout <= 0:
        raise KappaError(f"--timeout must be > 0 seconds, got {timeout}")
    settings = load_settings()
    table = Table(title="configuration", show_header=False)
    for key, value in settings.redacted().items():
        table.add_row(key, value)
    console.print(table)
    metadata = kafka_helpers.check_reachable(settings, timeout=timeout)
    console.print(f"[green]kafka ok[/]: {len(metadata.brokers)} broker(s), {len(metadata.topics)} topic(s)")
    s3_helpers.check_reachable(settings, timeout=timeout)
    console.print(f"[green]s3 ok[/]: {settings.s3_endpoint_url or 'AWS'}")
