"""`make demo`: the whole story on the local stack, every step a command a user could type.

It resets the local stack's default namespace (bucket ``kappa``, topic ``events``) so every run tells
the same story, and refuses to reset anything else. The steps are listed in the README.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from workers import kafka as kafka_helpers
from workers import keys
from workers import s3 as s3_helpers
from workers.config import Settings, apply_stack_env, load_settings
from workers.dev.stack import Stack
from workers.errors import KappaError
from workers.lag import LagReader

console = Console()
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STATE = ROOT / ".demo"
DASHBOARD_PORT = int(os.environ.get("KAPPA_DEMO_DASHBOARD_PORT", "8050"))
EVENTS = int(os.environ.get("KAPPA_DEMO_EVENTS", "40000"))
FAULTS = ["--duplicates", "0.05", "--late", "0.03", "--malformed", "0.02"]
ran: list[str] = []


# ---------------------------------------------------------------- running commands


def _argv(command: str) -> list[str]:
    args = shlex.split(command)
    if (BIN / args[0]).exists():
        args[0] = str(BIN / args[0])
    return args


def run(command: str, quiet: bool = False) -> str:
    """Show and run one command from the repo root; its output is shown unless ``quiet``."""
    console.print(f"[bold cyan]$ {command}[/]", highlight=False)
    ran.append(command)
    result = subprocess.run(_argv(command), cwd=ROOT, text=True, check=False,
                            capture_output=quiet)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-3:] if quiet else []
        raise KappaError(f"demo step failed (exit {result.returncode}): {command} {' '.join(detail)}")
    return result.stdout or ""


def background(name: str, command: str) -> int:
    """Start a long-running command detached (it outlives the demo); pid and log under .demo/."""
    console.print(f"[bold cyan]$ {command} &[/]  [dim](log: .demo/{name}.log)[/]", highlight=False)
    ran.append(f"{command} &")
    STATE.mkdir(exist_ok=True)
    with open(STATE / f"{name}.log", "wb") as log:
        process = subprocess.Popen(_argv(command), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(process.pid))
    return process.pid


def stop_background(names: list[str] | None = None) -> list[str]:
    """SIGTERM the demo's own background processes (by pid file) and wait for them."""
    stopped = []
    for pid_file in sorted(STATE.glob("*.pid")):
        if names is not None and pid_file.stem not in names:
            continue
        pid = int(pid_file.read_text())
        pid_file.unlink()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(150):
            if not _alive(pid):
                break
            time.sleep(0.2)
        stopped.append(pid_file.stem)
    return stopped


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


# ---------------------------------------------------------------- the story


def reset(settings: Settings, stack: Stack) -> None:
    """Delete the demo's topics, groups and objects -- only ever on the local stack."""
    if settings.s3_endpoint_url != stack.s3_endpoint or settings.bootstrap_servers != stack.bootstrap:
        raise KappaError("the demo resets its data and only runs against the local stack; unset KAPPA_* overrides")
    stop_background()
    admin = kafka_helpers.admin_client(settings)
    topics = [t for t in admin.list_topics(timeout=10).topics if t == "events" or t.startswith("events.")]
    kafka_helpers.delete_topics(settings, topics)
    groups = [g.group_id for g in admin.list_consumer_groups().result(timeout=10).valid
              if g.group_id.startswith(f"{settings.group_prefix}.")]
    if groups:
        for future in admin.delete_consumer_groups(groups, request_timeout=10).values():
            future.exception()
    client = s3_helpers.s3_client(settings)
    for obj in s3_helpers.iter_keys(client, settings.s3_bucket, ""):
        client.delete_object(Bucket=settings.s3_bucket, Key=obj["Key"])
    console.print(f"[dim]reset: {len(topics)} topics, {len(groups)} groups, bucket {settings.s3_bucket} emptied[/]")


def wait_caught_up(settings: Settings, groups: list[str], timeout: float = 600) -> None:
    """Wait until every group committed up to the end of the events topic (lag read from offsets only)."""
    reader = LagReader(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lags = {g: reader.group_lag(g, settings.events_topic) for g in groups}
        pending = {g: lag.lag if lag else -1 for g, lag in lags.items()}
        console.print(f"[dim]lag: {', '.join(f'{g}={n}' for g, n in pending.items())}[/]")
        if all(n == 0 for n in pending.values()):
            return
        time.sleep(3)
    raise KappaError(f"workers did not catch up within {timeout:.0f}s; see .demo/*.log")


def wait_archived(settings: Settings, day: str, timeout: float = 120) -> None:
    """Wait until the archiver's checkpoints cover the topic (its flush timer may lag its consumer)."""
    client = s3_helpers.s3_client(settings)
    end = kafka_helpers.end_offsets(settings, settings.events_topic)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = 0
        for partition, offset in end.items():
            body = s3_helpers.get_bytes(client, settings.s3_bucket, keys.archiver_checkpoint(settings.events_topic,
                                                                                           partition))
            done += body is not None and json.loads(body).get("next_offset", 0) >= offset
        if done == len(end):
            return
        time.sleep(2)
    raise KappaError(f"the archive of {day} did not complete within {timeout:.0f}s; see .demo/archiver.log")


def totals(frame: pl.DataFrame) -> dict[str, float]:
    return {"windows": frame.height, "events": int(frame["events"].sum()), "amount": round(frame["amount"].sum(), 2)}


def reconcile(settings: Settings, day: str) -> None:
    """Corrected v2 vs the archive's v1 computation vs live v1: every difference accounted for."""
    from workers.archive.format import read_day
    from workers.pipelines import get_pipeline
    from workers.processor import results

    client = s3_helpers.s3_client(settings)
    archive = read_day(client, settings.s3_bucket, settings.events_topic, day)
    batch_v1, stats_v1 = get_pipeline("orders", 1).batch_report(archive)
    report = results.corrected_report(client, settings.s3_bucket, "orders", 2, day)
    if report is None:
        raise KappaError(f"the reprocess run wrote no corrected report of orders v2 for {day}")
    corrected, stats_v2 = report.frame, report.stats
    live = results.live_results(client, settings.s3_bucket, "orders", 1, day, include_open=True)
    table = Table(title=f"orders, {day}: live vs corrected")
    for column in ("result", "windows", "events", "amount", "note"):
        table.add_column(column, justify="right" if column not in ("result", "note") else "left")
    rows = [
        ("live v1 (stream)", totals(live), "late records dropped by the live watermark"),
        ("v1 over the archive", totals(batch_v1), f"{stats_v1['dlq']} malformed -> DLQ, never counted"),
        ("corrected v2 (replay)", totals(corrected), f"{stats_v2['duplicates']} duplicates dropped"),
    ]
    for name, values, note in rows:
        table.add_row(name, str(values["windows"]), f"{values['events']:,}", f"{values['amount']:,.2f}", note)
    console.print(table)
    difference = totals(batch_v1)["events"] - totals(corrected)["events"]
    if difference != stats_v2['duplicates']:
        raise KappaError(f"corrected v2 differs from v1 by {difference} events, not by the "
                         f"{stats_v2['duplicates']} duplicates")
    console.print(f"[green]corrected v2 = v1 over the archive - {difference} duplicates, exactly[/]; "
                  f"live v1 missed {totals(batch_v1)['events'] - totals(live)['events']} late events "
                  "that the replay put back in their windows")


def promote_and_switch(settings: Settings) -> None:
    """Promote v2, then stop live v1 and start live v2 at the promoted offsets (no gap, no overlap)."""
    output = run("kappa promote --pipeline orders --version 2", quiet=True)
    console.print(output.rstrip(), highlight=False)
    start = next((line.strip() for line in output.splitlines() if "--handoff" in line), None)
    if start is None:
        raise KappaError("kappa promote did not print how to start the live processor at the switch")
    stop_background(["processor-v1"])
    background("processor-v2", f"{start} --progress log --checkpoint-seconds 2")


def trickle() -> None:
    """A steady live stream (event time = now) so the dashboard moves."""
    count = 20 * 3600
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    background("producer", f"kappa produce -n {count} --rate 20 --days {count / 20 / 86400:.6f} --start {now} "
                           f"--seed 11 {' '.join(FAULTS)} -q")


def start_dashboard() -> str:
    url = f"http://127.0.0.1:{DASHBOARD_PORT}"
    background("dashboard", f"kappa dashboard --port {DASHBOARD_PORT}")
    from workers.dashboard.launch import wait_ready

    wait_ready(url, timeout=60)
    return url


def where_to_look(stack: Stack, url: str, day: str) -> None:
    settings = load_settings()
    lines = [
        f"Dashboard       : {url}/   (live orders v2, DLQ, lag, replays, live vs corrected)",
        f"Kafka bootstrap : {stack.bootstrap}   topics {settings.events_topic}, {settings.dlq_topic}",
        f"S3 endpoint     : {stack.s3_endpoint}   bucket {settings.s3_bucket}: raw/, live/, reports/",
        "Dagster UI      : make dagster-dev  ->  http://127.0.0.1:3000  (Assets > corrected_report, "
        f"partition {day})",
        f"Reports         : .venv/bin/kappa report --pipeline orders --version 2 --day {day} [--live | --served]",
        "Replays         : .venv/bin/kappa replay status",
        "Stop the demo   : make demo-stop   (workers + dashboard; `make stack-down` stops Kafka and S3)",
    ]
    console.print(Panel.fit("\n".join(lines), title="where to look"))
    console.print("[bold]commands the demo ran:[/]")
    for command in ran:
        console.print(f"  {command}", highlight=False)


def story() -> None:
    day = str(dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))
    stack = Stack(log=lambda m: console.print(f"[dim]{m}[/]"))
    step("1. local stack: real Kafka (KRaft) + S3Proxy")
    run("kappa stack up")
    apply_stack_env()
    settings = load_settings()
    reset(settings, stack)

    step("2. live workers: archiver + orders v1 processor")
    kafka_helpers.ensure_topic(settings, settings.events_topic, 6)
    background("archiver", "kappa archiver --flush-seconds 5")
    background("processor-v1", "kappa processor --pipeline orders --version 1 --start earliest "
                               "--progress log --checkpoint-seconds 2")

    step(f"3. a day of events ({day}) with duplicates, late and malformed records")
    run(f"kappa produce -n {EVENTS} --start {day} --days 1 --seed 42 {' '.join(FAULTS)}")
    prefix = settings.group_prefix
    wait_caught_up(settings, [keys.archiver_group(prefix), keys.live_group("orders", 1, prefix=prefix)])
    wait_archived(settings, day)

    step(f"4. live report of {day} (orders v1, first rows)")
    run(f"kappa report --pipeline orders --version 1 --day {day} --live --format csv -o .demo/live-v1-{day}.csv",
        quiet=True)
    console.print(pl.read_csv(STATE / f"live-v1-{day}.csv").head(8))

    step(f"5. reprocess {day} with v2: S3 archive -> replay topic -> same processor, new group")
    run(f"dagster job execute -m kappa_dagster -j reprocess --tags "
        f"'{{\"dagster/partition\": \"{day}\", \"kappa/version\": \"2\"}}'", quiet=True)
    console.print("[green]reprocess run succeeded[/] (load -> consume -> corrected report, asset checks passed)")

    step("6. reconcile live and corrected")
    reconcile(settings, day)

    step("7. promote v2; live switches to v2 at the promoted offsets")
    promote_and_switch(settings)
    run("kappa replay status")

    step("8. live dashboard")
    trickle()
    url = start_dashboard()
    where_to_look(stack, url, day)


def main() -> None:
    if sys.argv[1:] == ["stop"]:
        stopped = stop_background()
        console.print(f"stopped: {', '.join(stopped)}" if stopped else "no demo process was running")
        return
    os.environ.setdefault("DAGSTER_HOME", str(ROOT / ".dagster_home"))
    try:
        story()
    except KappaError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
