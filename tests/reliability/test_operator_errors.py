"""Bad operator input: the real CLIs, run as subprocesses, fail with one clear line and write nothing.

Each case runs a command with one mistake (wrong bucket, bad credentials, unreachable endpoint,
unknown pipeline or version, malformed partition key, missing day) and checks: non-zero exit, no
traceback, a last line ``error: ...`` naming the problem, no secret in the output, the bucket's
objects and the cluster's topics unchanged. The Dagster CLI path is checked the same way, except
that Dagster prints its own step-failure logs (with stack traces), so there we require the clear
reason to be present rather than the absence of a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from workers import kafka as kafka_helpers
from workers.config import Settings

from .harness import DAY, cli, secrets_in
from .invariants import list_keys

WRONG_SECRET = f"wrong-secret-{uuid.uuid4().hex}"
MISSING_BUCKET = f"kappa-missing-{uuid.uuid4().hex[:8]}"
UNREACHABLE = "127.0.0.1:9"  # discard port: nothing listens


@dataclass(frozen=True)
class Mistake:
    args: tuple[str, ...]
    message: str  # a phrase the error line must contain (case-insensitive)
    env: dict[str, str] = field(default_factory=dict)


MISTAKES = {
    "invalid-bucket-name": Mistake(("archiver", "--until-end"), "not a valid S3 bucket name",
                                   {"KAPPA_S3_BUCKET": "Bad_Bucket"}),
    "missing-bucket-replay": Mistake(("replay", "load", "--day", DAY), MISSING_BUCKET,
                                     {"KAPPA_S3_BUCKET": MISSING_BUCKET}),
    "missing-bucket-report": Mistake(("report", "-p", "orders", "-v", "1", "--day", DAY), MISSING_BUCKET,
                                     {"KAPPA_S3_BUCKET": MISSING_BUCKET}),
    "bad-credentials-archiver": Mistake(("archiver", "--until-end"), "403", {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}),
    "bad-credentials-replay": Mistake(("replay", "load", "--day", DAY), "S3",
                                      {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}),
    "bad-credentials-processor": Mistake(("processor", "-p", "orders", "-v", "1"), "S3",
                                         {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}),
    "unreachable-s3": Mistake(("replay", "load", "--day", DAY), "127.0.0.1:9",
                              {"KAPPA_S3_ENDPOINT_URL": f"http://{UNREACHABLE}"}),
    # checked first, at once: the refused connection, not the timeout of a later call
    "unreachable-kafka": Mistake(("processor", "-p", "orders", "-v", "1"), "every broker is down",
                                 {"KAPPA_BOOTSTRAP_SERVERS": UNREACHABLE}),
    "unreachable-kafka-archiver": Mistake(("archiver", "--until-end"), "every broker is down",
                                          {"KAPPA_BOOTSTRAP_SERVERS": UNREACHABLE}),
    "unreachable-kafka-replay": Mistake(("replay", "load", "--day", DAY), "every broker is down",
                                        {"KAPPA_BOOTSTRAP_SERVERS": UNREACHABLE}),
    "unknown-pipeline": Mistake(("processor", "-p", "nosuch", "-v", "1"), "unknown pipeline 'nosuch'"),
    "unknown-version": Mistake(("processor", "-p", "orders", "-v", "99"), "no version 99"),
    "unknown-pipeline-replay": Mistake(("replay", "load", "--day", DAY, "--pipeline", "nosuch"), "unknown pipeline"),
    "unknown-version-report": Mistake(("report", "-p", "orders", "-v", "99", "--day", DAY), "no version 99"),
    "traversal-day": Mistake(("replay", "load", "--day", "../"), "not a date"),
    "impossible-day": Mistake(("replay", "load", "--day", "2026-13-45"), "not a real calendar date"),
    "traversal-day-report": Mistake(("report", "-p", "orders", "-v", "1", "--day", "../../etc"), "not a date"),
    "traversal-group": Mistake(("processor", "-p", "orders", "-v", "1", "--group", "../x", "--until-end"),
                               "consumer group"),
    "missing-day": Mistake(("replay", "load", "--day", "2020-01-01"), "nothing to replay"),
}


@dataclass
class Snapshot:
    """What an operator mistake must leave untouched: the bucket's objects and the cluster's topics."""

    objects: dict[str, str]
    topics: set[str]

    @classmethod
    def take(cls, settings: Settings, s3: Any) -> Snapshot:
        """This test's bucket and every topic named after its events topic (replay, DLQ); the shared
        cluster's other topics belong to other tests running meanwhile."""
        names = kafka_helpers.admin_client(settings).list_topics(timeout=30).topics
        return cls(list_keys(s3, settings.s3_bucket), {t for t in names if t.startswith(settings.events_topic)})


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout,
                          check=False)


def secrets(env: dict[str, str]) -> list[str]:
    names = ("AWS_SECRET_ACCESS_KEY", "KAPPA_KAFKA_SASL_PASSWORD")
    return [WRONG_SECRET, *(os.environ.get(n, "") for n in names), *(env.get(n, "") for n in names)]


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_operator_mistake_fails_with_one_clear_line_and_writes_nothing(case: str, settings: Settings, s3) -> None:
    mistake = MISTAKES[case]
    kafka_helpers.ensure_topic(settings, settings.events_topic, 3)
    before = Snapshot.take(settings, s3)
    result = run(cli(*mistake.args), mistake.env)
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("%")]
    assert result.returncode != 0, output
    assert "Traceback" not in output, output[-2000:]
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    assert mistake.message.lower() in " ".join(lines[-3:]).lower(), lines[-3:]
    assert not secrets_in(output, secrets(mistake.env))
    assert Snapshot.take(settings, s3) == before, "the failed command wrote to S3 or created topics"
    if case.startswith("missing-bucket"):
        with pytest.raises(ClientError):
            s3.head_bucket(Bucket=MISSING_BUCKET)


# ---------------------------------------------------------------- the Dagster CLI path

DAGSTER_MISTAKES = {
    "impossible-partition": ({"dagster/partition": "2026-13-45"}, "2026-13-45"),
    "traversal-partition": ({"dagster/partition": "../x"}, "../x"),
    "bad-version": ({"dagster/partition": DAY, "kappa/version": "99"}, "no version 99"),
    "missing-day": ({"dagster/partition": "2020-01-02"}, "nothing to replay"),
}


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((Path(__file__).parents[2] / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.mark.parametrize("case", sorted(DAGSTER_MISTAKES))
def test_dagster_reprocess_with_a_mistake_fails_clearly_and_writes_nothing(
    case: str, settings: Settings, s3, dagster_home: Path
) -> None:
    tags, reason = DAGSTER_MISTAKES[case]
    kafka_helpers.ensure_topic(settings, settings.events_topic, 3)
    before = Snapshot.take(settings, s3)
    dagster = str(Path(os.environ.get("VIRTUAL_ENV", Path(__file__).parents[2] / ".venv")) / "bin" / "dagster")
    result = run([dagster, "job", "execute", "-m", "kappa_dagster", "-j", "reprocess", "--tags", json.dumps(tags)],
                 {}, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert reason in output, output[-3000:]
    assert not secrets_in(output, secrets({}))
    after = Snapshot.take(settings, s3)
    assert after.topics == before.topics, f"topics created: {after.topics - before.topics}"
    assert after.objects == before.objects, f"objects written: {set(after.objects) - set(before.objects)}"
