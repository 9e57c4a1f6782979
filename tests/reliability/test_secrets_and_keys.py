"""Security additions: secrets never leak from workers or Dagster, S3 keys come only from validated
parts, and the dashboard listens on loopback by default.

Workers run against the shared stack's SASL/PLAIN listener with the SASL password and the S3 secret in
their environment; their whole output (and, for Dagster, every file of the run's DAGSTER_HOME: event
log, run storage, compute logs) is searched for those secrets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import keys
from workers.config import Settings
from workers.dev.stack import Stack
from workers.errors import KappaError

from .harness import (
    ARCHIVER_ARGS,
    DAY,
    LIVE_ARGS,
    Workers,
    bounded_args,
    load_args,
    produce_orders,
    replay_spec,
    wait_until,
)
from .harness import secrets_in as found_secrets


@pytest.fixture
def sasl_env(stack: Stack | None, settings: Settings) -> dict[str, str]:
    """Environment for workers that talk to Kafka over SASL/PLAIN (the stack's second listener)."""
    if stack is None or "KAPPA_STACK_SASL_PASSWORD" not in os.environ:
        pytest.skip("needs the local stack's SASL listener")
    return {
        "KAPPA_BOOTSTRAP_SERVERS": os.environ["KAPPA_STACK_SASL_BOOTSTRAP_SERVERS"],
        "KAPPA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAPPA_KAFKA_SASL_MECHANISM": "PLAIN",
        "KAPPA_KAFKA_SASL_USERNAME": os.environ["KAPPA_STACK_SASL_USERNAME"],
        "KAPPA_KAFKA_SASL_PASSWORD": os.environ["KAPPA_STACK_SASL_PASSWORD"],
    }


SECRET_NAMES = ("KAPPA_KAFKA_SASL_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")


def all_secrets(env: dict[str, str]) -> list[str]:
    """The secret values a process started with ``env`` (over ours) can see."""
    merged = {**os.environ, **env}
    return [merged[name] for name in SECRET_NAMES if merged.get(name)]


def test_workers_never_log_secrets(sasl_env: dict[str, str], settings: Settings, workers: Workers) -> None:
    """Archiver, live and bounded processor, replay loader over SASL: no secret in any output."""
    produce_orders(settings, 3_000, 5, start=f"{DAY}T00:00:00Z")
    runs = [workers.run("archiver", *ARCHIVER_ARGS, "--until-end", env=sasl_env)]
    spec = replay_spec(settings)
    runs.append(workers.run("load", *load_args(spec), env=sasl_env))
    runs.append(workers.run("bounded", *bounded_args(spec), env=sasl_env))
    live = workers.start("live", *LIVE_ARGS, "--progress", "log", env=sasl_env)
    wait_until(lambda: "records=" in live.output(), 60, "the live processor to report progress")
    live.signal(signal.SIGTERM)
    assert live.wait(60) == 0, live.tail()
    wrong = {**sasl_env, "KAPPA_KAFKA_SASL_PASSWORD": "wrong-sasl-password-42"}
    failed = workers.start("wrong-password", "processor", "-p", "orders", "-v", "1", "--debug", env=wrong)
    assert failed.wait(120) != 0
    for worker in [*runs, live]:
        assert not found_secrets(worker.output(), all_secrets(sasl_env)), f"secret in {worker.name} output"
    assert not found_secrets(failed.output(), [*all_secrets(sasl_env), "wrong-sasl-password-42"])


def test_dagster_runs_never_record_secrets(
    sasl_env: dict[str, str], settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    """A reprocess run over SASL: its CLI output and everything in DAGSTER_HOME are free of secrets."""
    produce_orders(settings, 3_000, 6, start=f"{DAY}T00:00:00Z")
    workers.run("archiver", *ARCHIVER_ARGS, "--until-end")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((Path(__file__).parents[2] / "dagster.yaml").read_text())
    dagster = Path(__file__).parents[2] / ".venv" / "bin" / "dagster"
    result = subprocess.run(
        [str(dagster), "job", "execute", "-m", "kappa_dagster", "-j", "reprocess",
         "--tags", json.dumps({"dagster/partition": DAY})],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, **sasl_env, "DAGSTER_HOME": str(home)},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    secrets = all_secrets(sasl_env)
    assert not found_secrets(result.stdout + result.stderr, secrets)
    leaked = [str(path) for path in home.rglob("*") if path.is_file()
              and any(secret.encode() in path.read_bytes() for secret in secrets)]
    assert not leaked, f"secrets stored by Dagster in {leaked}"


# ---------------------------------------------------------------- S3 keys only from validated parts

HOSTILE = st.one_of(
    st.sampled_from(["..", "../", "../../etc", "a/b", "/abs", "", " ", ".", "x\x00y", "2026-11-20/../x",
                     "2026-13-45", "2026-02-30", "20261120", "2026-1-2", "dt=2026-11-20", "%2e%2e"]),
    st.text(max_size=30),
)
BUILDERS = {
    "raw_day_prefix": lambda text: keys.raw_day_prefix(text, text),
    "raw_file": lambda text: keys.raw_file(text, text, 0, 0, 1),
    "report_file": lambda text: keys.report_file(text, 1, text),
    "report_file(day)": lambda text: keys.report_file("orders", 1, text),
    "current_pointer": keys.current_pointer,
    "live_prefix": lambda text: keys.live_prefix(text, 1),
    "replay_manifest": keys.replay_manifest,
    "archiver_checkpoint": lambda text: keys.archiver_checkpoint(text, 0),
    "processor_prefix": lambda text: keys.processor_prefix("orders", 1, text),
}
SAFE_KEY = re.compile(r"^[A-Za-z0-9._=/-]+$")


@settings(max_examples=300, deadline=None)
@given(text=HOSTILE, builder=st.sampled_from(sorted(BUILDERS)))
def test_s3_keys_reject_traversal_and_malformed_parts(text: str, builder: str) -> None:
    """Either the builder refuses the part, or the key is made of safe characters with no '..' segment."""
    try:
        key = BUILDERS[builder](text)
    except KappaError:
        return
    segments = key.split("/")
    assert SAFE_KEY.match(key), key
    assert ".." not in segments and "." not in segments and not key.startswith("/"), key
    assert "" not in segments[:-1], f"empty segment in {key!r}"


@pytest.mark.parametrize("day", ["../", "2026-13-45", "2026-02-30", "2026-11-20/..", "../../2026-11-20"])
def test_days_must_be_real_dates(day: str) -> None:
    with pytest.raises(KappaError):
        keys.valid_day(day)


@settings(deadline=None)  # behaviour, not speed: the shared 2-core machine once took 280 ms for one example
@given(day=st.dates(), partition=st.integers(0, 10_000), first=st.integers(0, 10**12), span=st.integers(0, 10**6))
def test_raw_file_keys_round_trip(day, partition: int, first: int, span: int) -> None:
    key = keys.raw_file("events", day.isoformat(), partition, first, first + span)
    assert keys.parse_raw_file(key) == {"topic": "events", "day": day.isoformat(), "partition": partition,
                                        "first_offset": first, "last_offset": first + span}


# ---------------------------------------------------------------- dashboard


def listening_addresses(pid: int) -> set[str]:
    import psutil

    return {f"{c.laddr.ip}" for c in psutil.Process(pid).net_connections(kind="inet") if c.status == "LISTEN"}


def test_dashboard_binds_to_loopback_by_default(settings: Settings, workers: Workers) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard = workers.start("dashboard", "dashboard", "--port", str(port))
    addresses = wait_until(lambda: listening_addresses(dashboard.pid) if dashboard.alive() else {"exited"}, 60,
                           "the dashboard to listen")
    assert addresses == {"127.0.0.1"}, f"{addresses}\n{dashboard.tail()}"
    dashboard.signal(signal.SIGTERM)
    dashboard.wait(30)
