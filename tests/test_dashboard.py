"""The dashboard against a real flow: generator -> live processor v1, plus a replayed v2 report.

One module-scoped flow (its own bucket and topics) feeds both tests:

* yesterday: 3,000 events with duplicates, late and malformed records, archived, replayed with v2
  (bounded processor -> corrected report) and loaded again for v1 (a replay still waiting);
* today: events keep arriving at ~250/s while a live v1 processor checkpoints every second.

The API test checks every section and the error paths; the browser test opens the page in headless
Chromium (Debian's package, ``make browser``), waits until numbers appear and change, and saves a
screenshot (copied to ``docs/dashboard.png`` only with KAPPA_UPDATE_DOCS_SCREENSHOT=1).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dagster_e2e import publish_replay

from workers import s3 as s3_helpers
from workers.config import Settings, load_settings
from workers.dashboard import launch
from workers.dev.generator import Faults, produce_events
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest

ROOT = Path(__file__).resolve().parent.parent
KAPPA = str(Path(sys.executable).parent / "kappa")
RATE = 250  # live events per second (the generator paces in steps of 1,000 records: one every 4 s)


@dataclass
class Flow:
    settings: Settings
    env: dict[str, str]
    url: str
    yesterday: str
    today: str
    tag: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def live_group(self) -> str:
        return f"kappa.orders.v1.live.dash-{self.tag}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, urllib.error.URLError, KeyError, TypeError):
            result = None
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def get(url: str) -> tuple[int, Any]:
    """GET a JSON endpoint: (status, body) for success and HTTP errors alike."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def kappa(env: dict[str, str], *args: str, timeout: float = 180) -> None:
    """Run a `kappa` command to completion; fail with its output if it fails."""
    result = subprocess.run([KAPPA, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"kappa {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def start(flow: Flow, log_dir: Path, name: str, *args: str) -> subprocess.Popen:
    log = (log_dir / f"{name}.log").open("w")
    process = subprocess.Popen([KAPPA, *args], env=flow.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    flow.processes.append(process)
    return process


def stop_all(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        process.terminate()
    for process in reversed(processes):
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def history(flow: Flow, day: str) -> None:
    """Yesterday's events, archived, replayed with v2 into a corrected report, and loaded for v1."""
    noon = int(dt.datetime.fromisoformat(f"{day}T12:00:00+00:00").timestamp() * 1000)
    faults = Faults(duplicates=0.08, late=0.02, malformed=0.05)
    produce_events(flow.settings, 3_000, start=noon, days=10 / 1440, partitions=3, seed=7, faults=faults)
    kappa(flow.env, "archiver", "--until-end", "--group", f"kappa.archiver.dash-{flow.tag}")
    # v2 consumed, then through the gate: only a published report shows as corrected
    publish_replay(flow.settings, s3_helpers.s3_client(flow.settings), 2, day, 2)
    spec = replay_loader.ReplaySpec("orders", 1, day, flow.settings.events_topic, flow.settings.s3_bucket, 2)
    replay_loader.load(flow.settings, spec)


def live(flow: Flow, log_dir: Path) -> None:
    """Live v1 processor plus a steady producer whose event time follows the wall clock."""
    start(flow, log_dir, "processor", "processor", "-p", "orders", "-v", "1", "--group", flow.live_group,
          "--start", "earliest", "--checkpoint-seconds", "1", "--progress", "none")
    count = RATE * 3600
    start(flow, log_dir, "produce", "produce", "-n", str(count), "--rate", str(RATE), "--days",
          str(count / RATE / 86_400), "--start", dt.datetime.now(dt.UTC).isoformat(), "--partitions", "3",
          "--seed", "8", "--duplicates", "0.05", "--malformed", "0.05", "--late", "0.01", "-q")


@pytest.fixture(scope="module")
def flow(stack: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    tag = uuid.uuid4().hex[:8]
    env = {**os.environ, "KAPPA_S3_BUCKET": f"kappa-dash-{tag}", "KAPPA_EVENTS_TOPIC": f"events-dash-{tag}"}
    env["KAPPA_DLQ_TOPIC"] = f"{env['KAPPA_EVENTS_TOPIC']}.dlq"
    settings = load_settings(env)
    s3_helpers.ensure_bucket(s3_helpers.s3_client(settings), settings.s3_bucket)
    now = dt.datetime.now(dt.UTC)
    port = free_port()
    flow = Flow(
        settings, env, f"http://127.0.0.1:{port}", str((now - dt.timedelta(days=1)).date()), str(now.date()),
        tag,
    )
    log_dir = tmp_path_factory.mktemp("dashboard-logs")
    try:
        history(flow, flow.yesterday)
        live(flow, log_dir)
        dashboard, _ = launch.spawn(port, interval=1, env=env, log=log_dir / "dashboard.log")
        flow.processes.append(dashboard)
        launch.wait_ready(flow.url, dashboard)
        wait_for("live results", lambda: get(f"{flow.url}/api/results")[1]["results"]["totals"]["events"], 90)
        yield flow
    finally:
        stop_all(flow.processes)
        print(*(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log"))), sep="\n")
        cleanup_kafka(settings)


def cleanup_kafka(settings: Settings) -> None:
    """Drop this flow's topics (the broker is shared); S3 buckets are cheap and kept for debugging."""
    from workers import kafka as kafka_helpers

    client = s3_helpers.s3_client(settings)
    topics = [m.replay_topic for m in replay_manifest.iter_manifests(client, settings.s3_bucket)]
    kafka_helpers.delete_topics(settings, [settings.events_topic, settings.dlq_topic, settings.late_topic, *topics])


# ---------------------------------------------------------------- JSON API


def test_api_serves_every_section_and_numbers_grow(flow: Flow) -> None:
    status, snap = get(f"{flow.url}/api/snapshot?diff_day={flow.yesterday}")
    assert status == 200
    assert snap["view"] | {"day": flow.today, "version": 1, "live_group": flow.live_group} == snap["view"]
    assert {"purchase", "page_view"} <= set(snap["results"]["types"])
    assert snap["processor"]["partitions"] == 3
    late_rows = {row["day"]: row for row in snap["processor"]["late_by_day"]}
    today = late_rows[flow.today]
    assert today["records"] == snap["processor"]["day"]["records"] and today["late"] == snap["processor"]["day"]["late"]
    for row in late_rows.values():
        assert row["share"] == pytest.approx(row["late"] / row["records"], abs=1e-6)
        assert row["candidate"] == (row["late"] / row["records"] > snap["processor"]["late_rerun_share"])
    assert snap["dlq"]["records"] > 0 and snap["dlq"]["reasons"]

    lag = {row["group"]: row for row in snap["lag"]}
    assert lag[flow.live_group]["started"] and lag[flow.live_group]["end"] > 0

    replays = {row["version"]: row for row in snap["replays"]}
    assert replays[2]["state"] == "reported" and replays[2]["percent"] == 100
    assert replays[1]["state"] == "waiting" and replays[1]["percent"] == 0 and replays[1]["lag"] > 0

    diff = snap["diff"]
    assert diff["available"] and diff["corrected_version"] == 2 and not diff["promoted"]
    assert diff["events_delta"] == diff["corrected_events"] - diff["live_events"]
    assert diff["windows_changed"] > 0 and diff["rows"]

    before = snap["results"]["totals"]["events"]
    wait_for("live totals to grow", lambda: get(f"{flow.url}/api/results")[1]["results"]["totals"]["events"] > before)


@pytest.mark.parametrize(
    ("query", "message"),
    [("day=2026-13-45", "not a real calendar date"), ("version=abc", "positive integer"),
     ("pipeline=Bad-Name", "must match"), ("pipeline=orders&version=99", "has no version 99")],
)
def test_api_rejects_bad_parameters_with_one_line(flow: Flow, query: str, message: str) -> None:
    status, body = get(f"{flow.url}/api/snapshot?{query}")
    assert status == 400 and message in body["error"] and "\n" not in body["error"]


def test_api_is_read_only_and_streams_server_sent_events(flow: Flow) -> None:
    request = urllib.request.Request(f"{flow.url}/api/snapshot", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405

    with urllib.request.urlopen(f"{flow.url}/api/stream", timeout=30) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        events = []
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(json.loads(line.removeprefix("data:")))
            if len(events) == 2:
                break
    assert all(event["view"]["bucket"] == flow.settings.s3_bucket for event in events)
    assert events[0]["view"]["generated_at"] <= events[1]["view"]["generated_at"]


def test_replay_status_cli_shows_both_replays(flow: Flow) -> None:
    result = subprocess.run([KAPPA, "replay", "status", "--sample", "0.5"], env=flow.env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip().startswith("orders-")}
    v2, v1 = (next(line for rid, line in lines.items() if rid.startswith(f"orders-v{v}-")) for v in (2, 1))
    assert "100%" in v2 and "reported" in v2
    assert "0%" in v1 and "waiting" in v1 and flow.yesterday in v1


# ---------------------------------------------------------------- browser


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.skipif(not launch.CHROMIUM.exists(), reason="needs Debian's chromium (make browser)")
def test_browser_shows_live_numbers_that_change(flow: Flow, tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"
    with launch.browser_page() as page:
        page.goto(f"{flow.url}/?diff_day={flow.yesterday}")
        launch.wait_rendered(page)
        first = number(page.inner_text("#total-events"))
        assert first > 0
        page.wait_for_function(
            "(first) => Number(document.querySelector('#total-events').textContent.replace(/,/g, '')) > first",
            arg=first, timeout=45_000,
        )
        assert number(page.inner_text("#dlq-records")) > 0
        assert page.locator("#chart-events canvas").count() == 1
        assert page.locator("#replay-table tbody tr").count() == 2
        assert "reported" in page.inner_text("#replay-table")
        assert page.locator("#diff-table tbody tr td.num").count() > 0
        assert flow.today in page.inner_text("#late-table") and "%" in page.inner_text("#late-table tbody")
        assert page.inner_text("#errors") == ""
        page.wait_for_timeout(1500)  # let the charts settle for the picture
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("KAPPA_UPDATE_DOCS_SCREENSHOT") == "1":  # docs/dashboard.png is taken mid-demo otherwise
        shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")
