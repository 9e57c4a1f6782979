"""A private stack for fault injection: its own Kafka + S3Proxy on free ports and its own data dir.

Restarting the broker or stopping S3 here never disturbs the shared stack the other tests use.
The fixture exports the private stack's addresses and credentials to the environment (for
in-process code and subprocess workers) for the duration of each test that uses it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shlex
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from workers import config as cfg
from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings, load_settings
from workers.dev.stack import Layout, Ports, Stack

from .harness import Workers, seed_for
from .invariants import FIGURES, Figures

STACK_VARIABLES = (
    "KAPPA_BOOTSTRAP_SERVERS",
    "KAPPA_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
)


#: the suite's own stack (29092-29094, 29000) and the demo's (19092-19094, 19000): never handed out
STACK_PORTS = range(29000, 29100), range(19000, 19100)


def ephemeral_ports() -> range:
    """The kernel's range for the local side of outgoing connections."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port_block(size: int = 3) -> int:
    """A base port with ``size`` consecutive free ports after it, outside the kernel's ephemeral range.

    A private stack stops and starts its services on these ports. An ephemeral port, free while its
    broker was down, was once taken by an outgoing connection of a test running alongside, and the
    broker could not start again ("Address already in use"). Outgoing connections never get a port
    outside that range."""
    ephemeral = ephemeral_ports()
    # below the range when there is room (Linux's default starts at 32768), else above it
    outside = range(10_000, ephemeral.start) if ephemeral.start - 10_000 > 1_000 else range(ephemeral.stop, 65_536)
    if len(outside) < 1_000:
        raise RuntimeError(f"the kernel's ephemeral port range {ephemeral.start}-{ephemeral.stop - 1} leaves no "
                           f"room for a private stack's ports (net.ipv4.ip_local_port_range)")
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(outside.start, outside.stop - size)
        block = range(base, base + size)
        if any(port in ephemeral or any(port in taken for taken in STACK_PORTS) for port in block):
            continue
        if all(_free(port) for port in block):
            return base
    raise RuntimeError(f"no block of {size} free ports found in {outside.start}-{outside.stop - 1}")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def private_stack(stack: Stack | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if stack is None:
        pytest.skip("fault injection needs a local stack it can stop and start (tests run on an external cluster)")
    root = tmp_path_factory.mktemp("private-stack")
    kafka = free_port_block(3)
    ports = Ports(kafka=kafka, controller=kafka + 1, kafka_sasl=kafka + 2, s3=free_port_block(1))
    stack = Stack(layout=Layout(root=root, jars_root=cfg.cache_dir() / "jars"), ports=ports, log=print)
    try:
        stack.up()
        yield stack
    finally:
        kafka_helpers.drop_admin_clients()
        stack.down()


@pytest.fixture
def private_settings(private_stack: Stack, unique, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings (and environment) pointing at the private stack, with a fresh bucket and topics."""
    values = cfg.read_env_file(private_stack.layout.env_file)
    for name in STACK_VARIABLES:
        monkeypatch.setenv(name, values[name])
    events = unique("events")
    monkeypatch.setenv("KAPPA_GROUP_PREFIX", unique("kappa"))  # also keys the per-host instance-id slots
    monkeypatch.setenv("KAPPA_S3_BUCKET", unique("kappa-rel"))
    monkeypatch.setenv("KAPPA_EVENTS_TOPIC", events)
    monkeypatch.setenv("KAPPA_DLQ_TOPIC", f"{events}.dlq")
    settings = load_settings()
    s3_helpers.ensure_bucket(s3_helpers.s3_client(settings), settings.s3_bucket)
    return settings


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Start real CLI workers for this test; any still running are SIGKILLed at teardown."""
    factory = Workers(tmp_path / "logs")
    factory.directory.mkdir()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The test's printed, replayable seed (``KAPPA_RELIABILITY_SEED`` overrides it)."""
    return seed_for(request.node.nodeid)


@pytest.fixture(autouse=True)
def figures_of_this_test(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """Attribute what this test counts (faults, records checked, lost, ...) to it in the figures."""
    FIGURES.current_test = request.node.nodeid
    yield FIGURES
    FIGURES.current_test = ""


#: The final outcome of each reliability test of this session (``failed`` wins over ``passed``).
OUTCOMES: dict[str, str] = {}
STARTED = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        OUTCOMES[report.nodeid] = "failed" if report.when == "call" else "error"
    elif report.skipped and report.nodeid not in OUTCOMES:
        OUTCOMES[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed:
        OUTCOMES.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the figures and how the run went (commit, date, outcomes) as JSON.

    To ``KAPPA_RELIABILITY_FIGURES`` if set (``make reliability-figures`` points it at a temp file and
    moves that into docs/ only when pytest exits 0), else into pytest's temp dir.
    """
    if not OUTCOMES:
        return  # no reliability test ran in this session
    target = os.environ.get("KAPPA_RELIABILITY_FIGURES")
    path = Path(target) if target else session.config._tmp_path_factory.getbasetemp() / "reliability-figures.json"
    document = {"run": run_record(session, exitstatus), **FIGURES.as_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\n[reliability] figures written to {path}")


def run_record(session: pytest.Session, exitstatus: int) -> dict[str, object]:
    """What a reader needs to trust the figures: which code, when, which selection, what passed."""
    counts = Counter(OUTCOMES.values())
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["pytest", *session.config.invocation_params.args]),
        "exitstatus": int(exitstatus),
        "green": int(exitstatus) == 0 and counts["failed"] == counts["error"] == 0 and counts["passed"] > 0,
        "passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
        "skipped": counts["skipped"], "seconds": round(time.monotonic() - STARTED),
        "tests": dict(sorted(OUTCOMES.items())),
    }


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


@pytest.fixture
def private_s3(private_settings: Settings) -> Any:
    """A boto3 client for the private stack's S3 server."""
    return s3_helpers.s3_client(private_settings)
