"""Security: S3 needs credentials, Kafka clients take SASL settings from the environment, secrets never leak."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from botocore.exceptions import ClientError

from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings, load_settings
from workers.dev.stack import Stack
from workers.errors import UnreachableError


def sasl_env(password: str) -> dict[str, str]:
    return {
        "KAPPA_BOOTSTRAP_SERVERS": os.environ["KAPPA_STACK_SASL_BOOTSTRAP_SERVERS"],
        "KAPPA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAPPA_KAFKA_SASL_MECHANISM": "PLAIN",
        "KAPPA_KAFKA_SASL_USERNAME": os.environ["KAPPA_STACK_SASL_USERNAME"],
        "KAPPA_KAFKA_SASL_PASSWORD": password,
    }


@pytest.fixture
def local_stack(stack: Stack | None) -> Stack:
    if stack is None:
        pytest.skip("needs the local stack's SASL listener")
    return stack


def test_sasl_plain_listener_accepts_env_credentials(local_stack: Stack, settings: Settings, unique) -> None:
    sasl = load_settings({**sasl_env(os.environ["KAPPA_STACK_SASL_PASSWORD"]), "KAPPA_S3_BUCKET": settings.s3_bucket})
    assert sasl.kafka_config()["security.protocol"] == "SASL_PLAINTEXT"
    topic = unique("sasl")
    assert kafka_helpers.ensure_topic(sasl, topic, 1)
    assert kafka_helpers.partition_count(sasl, topic) == 1


def test_sasl_wrong_password_is_refused_without_leaking_it(local_stack: Stack) -> None:
    wrong = load_settings(sasl_env("definitely-wrong-password"))
    with pytest.raises(UnreachableError) as refused:
        kafka_helpers.check_reachable(wrong, timeout=5)
    assert "definitely-wrong-password" not in str(refused.value)


def test_anonymous_s3_requests_are_refused(local_stack: Stack, settings: Settings, s3) -> None:
    s3.put_object(Bucket=settings.s3_bucket, Key="secret.txt", Body=b"x")
    for url in (f"{settings.s3_endpoint_url}/", f"{settings.s3_endpoint_url}/{settings.s3_bucket}/secret.txt"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 403


def test_s3_with_bad_credentials_is_refused_with_a_clear_error(local_stack: Stack, settings: Settings) -> None:
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret-123"}
    bad = load_settings(env)
    with pytest.raises(UnreachableError, match="refused") as refused:
        s3_helpers.check_reachable(bad, timeout=5)
    assert "not-the-secret-123" not in str(refused.value)
    with pytest.raises(ClientError):
        s3_helpers.s3_client(bad, retries=1).get_object(Bucket=settings.s3_bucket, Key="x")


def test_kappa_check_never_prints_secrets(local_stack: Stack, settings: Settings) -> None:
    env = {**os.environ, **sasl_env(os.environ["KAPPA_STACK_SASL_PASSWORD"])}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "check", "--timeout", "10"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for secret in (env["KAPPA_STACK_SASL_PASSWORD"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"]):
        assert secret not in output
    assert "***" in output
