"""The `kappa` command: one typer app, one module per command group."""
# ruff: noqa: E402  (polars_pool.size_for must run before the imports after it)

from __future__ import annotations

import faulthandler
import os
import signal
import sys

from workers import polars_pool

# polars sizes its thread pool when it is imported, which the command modules below do
polars_pool.size_for(sys.argv)

import typer
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from confluent_kafka import KafkaException
from rich.console import Console
from rich.markup import escape

from workers.cli import archive as archive_cmd
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
app.add_typer(archive_cmd.app, name="archive")
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


def describe_service_error(exc: Exception) -> str:
    """One line for an S3 or Kafka failure that reached the top: what failed and where, never credentials."""
    bucket = os.environ.get("KAPPA_S3_BUCKET", "kappa")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "error"), error.get("Message", "")
        return (f"S3 {exc.operation_name} on bucket {bucket!r} failed: {code} {message}".rstrip()
                + "; check KAPPA_S3_BUCKET and the AWS credentials")
    if isinstance(exc, EndpointConnectionError):
        endpoint = os.environ.get("KAPPA_S3_ENDPOINT_URL") or "AWS S3"
        return f"S3 at {endpoint} is unreachable; start it with `kappa stack up` or check KAPPA_S3_ENDPOINT_URL"
    if isinstance(exc, BotoCoreError):
        return f"S3 request failed: {type(exc).__name__}: {exc}"
    error = exc.args[0] if exc.args else None
    detail = error.str() if hasattr(error, "str") else str(exc)
    servers = os.environ.get("KAPPA_BOOTSTRAP_SERVERS", "?")
    return f"Kafka at {servers} failed: {detail}; check KAPPA_BOOTSTRAP_SERVERS and the security settings"


def main() -> None:
    """Entry point: user mistakes and unreachable/refusing services print one red line and exit 2;
    --debug shows the traceback. ``kill -USR1 <pid>`` prints every thread's stack to stderr: where a
    worker that seems stuck is waiting."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app()
    except (KappaError, BotoCoreError, ClientError, KafkaException) as exc:
        if os.environ.get("KAPPA_DEBUG") == "1":
            raise
        text = str(exc) if isinstance(exc, KappaError) else describe_service_error(exc)
        err.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
