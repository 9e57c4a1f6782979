"""The `kappa` command: one typer app, one module per command group."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from workers.cli import archiver as archiver_cmd
from workers.cli import check as check_cmd
from workers.cli import dashboard as dashboard_cmd
from workers.cli import processor as processor_cmd
from workers.cli import produce as produce_cmd
from workers.cli import promote as promote_cmd
from workers.cli import replay as replay_cmd
from workers.cli import replay_status as replay_status_cmd
from workers.cli import report as report_cmd
from workers.cli import stack as stack_cmd
from workers.errors import KappaError

app = typer.Typer(
    name="kappa",
    help="Kappa architecture on Kafka + S3: run the live workers, replay history, read reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(stack_cmd.app, name="stack")
app.command("check")(check_cmd.check)
app.command("archiver")(archiver_cmd.archiver)
app.add_typer(replay_cmd.app, name="replay")
app.command("promote")(promote_cmd.promote)
app.command("rollback")(promote_cmd.rollback)
app.command("produce")(produce_cmd.produce)
app.command("dashboard")(dashboard_cmd.dashboard)
app.command("processor")(processor_cmd.processor)
app.command("report")(report_cmd.report)
replay_cmd.app.command("status")(replay_status_cmd.status)

err = Console(stderr=True)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    if debug:
        os.environ["KAPPA_DEBUG"] = "1"


def main() -> None:
    """Entry point: user mistakes print one red line and exit 2; --debug shows the traceback."""
    try:
        app()
    except KappaError as exc:
        if os.environ.get("KAPPA_DEBUG") == "1":
            raise
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
