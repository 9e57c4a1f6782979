"""`kappa dashboard`: the read-only live dashboard (results, DLQ, lag, replays, live vs corrected)."""

from __future__ import annotations

import typer
from rich.console import Console

from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import load_settings

console = Console(stderr=True)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def dashboard(
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default serves this machine only."),
    port: int = typer.Option(8050, help="TCP port."),
    interval: float = typer.Option(2.0, help="Seconds between pushed updates."),
) -> None:
    """Serve the live dashboard on http://HOST:PORT (Ctrl-C stops it)."""
    from workers.dashboard.app import check_options, serve  # web stack imported only for this command

    check_options(host, port, interval)
    settings = load_settings()
    kafka_helpers.check_reachable(settings, timeout=10)
    s3_helpers.check_reachable(settings, timeout=10)
    if host not in LOOPBACK:
        console.print(f"[yellow]warning:[/] serving on {host} without authentication (read-only data)")
    console.print(
        f"dashboard on [bold]http://{host}:{port}/[/] "
        f"(bucket {settings.s3_bucket}, topic {settings.events_topic}); Ctrl-C to stop",
        highlight=False,
    )
    serve(settings, host=host, port=port, interval=interval)
