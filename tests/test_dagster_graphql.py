"""The UI path: a run and a 3-day partition backfill launched through GraphQL against a real
dagster-webserver + dagster-daemon (temp DAGSTER_HOME, the repo's workspace.yaml). The backfill is ONE
run over the range (``BackfillPolicy.single_run``), checked per day."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster_e2e import RANGE_END, RANGE_START, archive, day_check_results, report, wait_for
from dagster_env import ROOT, dagster_home  # noqa: F401  (fixture)
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError
from polars.testing import assert_frame_equal
from replay_data import orders_report, write_days

from workers.config import Settings

pytestmark = pytest.mark.slow
DAYS = ["2026-11-20", "2026-11-21", "2026-11-22"]
BIN = Path(sys.executable).parent

LAUNCH_BACKFILL = """
mutation Backfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { invalidOutputName }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on RunConflict { message }
    ... on InvalidSubsetError { message }
  }
}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dagster_services(dagster_home: Path, tmp_path: Path) -> Iterator[int]:  # noqa: F811
    """dagster-webserver + dagster-daemon on the repo's workspace, stopped (by pid) afterwards."""
    port = free_port()
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("webserver", "daemon")}
    commands = {
        "webserver": [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        "daemon": [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
    }
    processes = [
        subprocess.Popen(command, cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT)
        for name, command in commands.items()
    ]
    try:
        wait_for(lambda: _answers(port), 120, "dagster-webserver", interval=1)
        yield port
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs.values():
            log.close()


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _status(client: DagsterGraphQLClient, run_id: str) -> dg.DagsterRunStatus | None:
    try:
        return client.get_run_status(run_id)
    except DagsterGraphQLClientError:
        return None


def test_run_and_backfill_through_graphql_with_the_daemon(
    settings: Settings, s3: Any, dagster_services: int, tmp_path: Path
) -> None:
    write_days(s3, settings.s3_bucket, settings.events_topic, DAYS, 600)
    client = DagsterGraphQLClient("127.0.0.1", port_number=dagster_services)
    done = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}

    # "Launch run" from the UI: one partition, version picked by tag
    run_id = client.submit_job_execution(
        "reprocess", tags={"dagster/partition": DAYS[0], "kappa/version": "2"}, repository_location_name="kappa_dagster"
    )
    wait_for(lambda: _status(client, run_id) in done, 180, "the launched run", interval=2)
    assert client.get_run_status(run_id) == dg.DagsterRunStatus.SUCCESS

    # "Launch backfill" over a partition range: the daemon launches ONE run for the whole range
    params = {
        "selector": {
            "partitionSetName": "reprocess_partition_set",
            "repositorySelector": {"repositoryLocationName": "kappa_dagster", "repositoryName": "__repository__"},
        },
        "partitionNames": DAYS,
        "tags": [{"key": "kappa/version", "value": "2"}],
    }
    launched = client._execute(LAUNCH_BACKFILL, {"backfillParams": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    with dg.DagsterInstance.get() as instance:

        def backfill_runs() -> list[dg.DagsterRun]:
            return list(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})))

        wait_for(
            lambda: bool(backfill_runs()) and all(r.status in done for r in backfill_runs()),
            420,
            "the backfill run",
            interval=3,
        )
        (run,) = backfill_runs()
        assert (run.tags[RANGE_START], run.tags[RANGE_END]) == (DAYS[0], DAYS[-1])
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.run_id
        assert run.tags.get("kappa/replay") == "true"
        green = {"report_matches_reference": True, "records_accounted": True, "report_matches_batch": True}
        assert day_check_results(instance, run.run_id) == {day: green for day in DAYS}
    for day in DAYS:
        expected = orders_report(archive(s3, settings, day), version=2)
        assert_frame_equal(report(s3, settings, 2, day), expected, check_exact=False, rel_tol=1e-12)
