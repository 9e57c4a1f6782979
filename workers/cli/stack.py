"""`kappa stack up|down|status|logs|reset`: the local Kafka + S3Proxy stack."""

from __future__ import annotations

import subprocess
from enum import StrEnum

import typer
from rich.console import Console
from rich.table import Table

from workers.dev.stack import SERVICES, Stack

app = typer.Typer(help="Start, stop and inspect the local Kafka broker and S3 server.", no_args_is_help=True)
console = Console()


class Service(StrEnum):
    kafka = "kafka"
    s3proxy = "s3proxy"


def _selected(only: list[Service] | None) -> list[str]:
    return [s.value for s in only] if only else list(SERVICES)


def _stack() -> Stack:
    return Stack(log=lambda message: console.print(f"[dim]{message}[/]"))


@app.command()
def up(
    only: list[Service] = typer.Option(None, "--only", help="Start only this service (repeatable)."),
    timeout: float = typer.Option(120, help="Seconds to wait for each service to answer."),
) -> None:
    """Fetch jars if needed, start Kafka and S3Proxy, wait until both answer."""
    stack = _stack()
    stack.up(_selected(only), timeout=timeout)
    _print_status(stack)
    console.print(f"env file: {stack.layout.env_file}")


@app.command()
def down(only: list[Service] = typer.Option(None, "--only", help="Stop only this service (repeatable).")) -> None:
    """Stop the processes `up` started (by pid file). Data is kept."""
    stopped = _stack().down(_selected(only))
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def reset(yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Delete every topic and S3 object of the stopped stack (jars, secrets and logs stay)."""
    stack = _stack()
    if not yes:
        typer.confirm(f"Delete all Kafka topics and S3 objects under {stack.layout.root}?", abort=True)
    removed = stack.reset()
    console.print(f"removed: {', '.join(map(str, removed))}" if removed else "no data to remove")


@app.command()
def status() -> None:
    """Show what runs where."""
    stack = _stack()
    _print_status(stack)
    if not stack.running():
        raise typer.Exit(1)


@app.command()
def logs(
    service: Service = typer.Argument(Service.kafka),
    lines: int = typer.Option(50, "-n", "--lines"),
    follow: bool = typer.Option(False, "-f", "--follow"),
) -> None:
    """Print (or follow) a service's log."""
    path = _stack().layout.log_file(service.value)
    if not path.exists():
        console.print(f"no log yet at {path}")
        raise typer.Exit(1)
    subprocess.run(["tail", f"-n{lines}", *(["-f"] if follow else []), str(path)], check=False)


def _print_status(stack: Stack) -> None:
    table = Table(title="kappa stack")
    for column in ("service", "state", "pid", "address", "data"):
        table.add_column(column)
    for row in stack.status():
        colour = "green" if row["state"] == "running" else "red"
        table.add_row(row["service"], f"[{colour}]{row['state']}[/]", row["pid"], row["address"], row["data"])
    console.print(table)
