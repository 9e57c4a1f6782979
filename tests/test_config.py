"""Configuration: env vars map to settings, secrets never print, bad values fail with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers import keys
from workers.archive.archiver import Archiver, ArchiverOptions
from workers.config import kafka_passthrough, load_settings
from workers.dev.generator import produce_events
from workers.errors import ConfigError, KappaError
from workers.processor.engine import run_processor
from workers.replay.loader import RangeSpec, ReplaySpec

BASE = {"KAPPA_BOOTSTRAP_SERVERS": "broker:9092"}


def test_kafka_settings_pass_through_to_librdkafka() -> None:
    env = {
        **BASE,
        "KAPPA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAPPA_KAFKA_SASL_MECHANISM": "PLAIN",
        "KAPPA_KAFKA_SASL_USERNAME": "alice",
        "KAPPA_KAFKA_SASL_PASSWORD": "s3cr3t-value",
    }
    config = load_settings(env).kafka_config(**{"group.id": "g"})
    assert config == {
        "bootstrap.servers": "broker:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "alice",
        "sasl.password": "s3cr3t-value",
        "group.id": "g",
    }


def test_secrets_are_redacted_everywhere_printable() -> None:
    env = {**BASE, "KAPPA_KAFKA_SASL_PASSWORD": "s3cr3t-value", "AWS_SECRET_ACCESS_KEY": "aws-s3cr3t",
           "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}
    settings = load_settings(env)
    printed = repr(settings) + str(settings.redacted())
    for secret in ("s3cr3t-value", "aws-s3cr3t", "AKIAEXAMPLE"):
        assert secret not in printed


def test_real_aws_when_endpoint_unset() -> None:
    settings = load_settings(BASE)
    assert settings.s3_endpoint_url is None
    assert settings.s3_bucket == "kappa"
    assert settings.dlq_topic == "events.dlq"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "KAPPA_BOOTSTRAP_SERVERS"),
        ({**BASE, "KAPPA_S3_BUCKET": "Bad_Bucket"}, "KAPPA_S3_BUCKET"),
        ({**BASE, "KAPPA_EVENTS_TOPIC": "bad topic!"}, "KAPPA_EVENTS_TOPIC"),
        ({**BASE, "KAPPA_GROUP_PREFIX": "team a"}, "KAPPA_GROUP_PREFIX"),
        ({**BASE, "KAPPA_GROUP_PREFIX": "x" * 101}, "KAPPA_GROUP_PREFIX"),
    ],
)
def test_bad_config_fails_with_a_message_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_every_group_the_workers_name_starts_with_the_group_prefix() -> None:
    """Two deployments on one cluster (``KAPPA_GROUP_PREFIX``) share no consumer group; the default
    names stay ``kappa.*``."""
    assert load_settings(BASE).group_prefix == "kappa"
    assert keys.archiver_group("kappa") == "kappa.archiver"
    assert keys.live_group("orders", 1, prefix="kappa") == "kappa.orders.v1.live"
    settings = load_settings({**BASE, "KAPPA_GROUP_PREFIX": "team-a"})
    archiver = Archiver(settings, ArchiverOptions())
    assert archiver.options.group == "team-a.archiver"
    assert Archiver(settings, ArchiverOptions(group="chosen")).options.group == "chosen"
    with pytest.raises(KappaError, match="--group must not be empty"):
        Archiver(settings, ArchiverOptions(group=""))
    assert keys.live_group("orders", 2, prefix=settings.group_prefix) == "team-a.orders.v2.live"
    spec = ReplaySpec("orders", 2, "2026-11-20", "events", "kappa", group_prefix=settings.group_prefix)
    assert spec.group.startswith("team-a.orders.v2.replay.")
    assert RangeSpec.of(spec, ["2026-11-20", "2026-11-21"]).group.startswith("team-a.orders.v2.replay.")
    assert keys.shuffle_group(keys.live_group("orders", 2, prefix="team-a")).startswith("team-a.")


def test_an_empty_topic_or_group_is_refused_not_replaced_by_the_default() -> None:
    """Only a missing name takes the default; an empty one is a mistake. Each check comes before
    anything connects (the broker here does not exist)."""
    settings = load_settings(BASE)
    with pytest.raises(KappaError, match="topic '' is not a valid"):
        Archiver(settings, ArchiverOptions(topic=""))
    with pytest.raises(KappaError, match="topic '' is not a valid"):
        produce_events(settings, 1, topic="")
    for name in ("topic", "dlq_topic", "late_topic"):
        with pytest.raises(KappaError, match="topic '' is not a valid"):
            run_processor(settings, "orders", 1, bounded=True, **{name: ""})
    with pytest.raises(KappaError, match="consumer group '' must match"):
        run_processor(settings, "orders", 1, bounded=True, group="")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["processor", "-p", "orders", "-v", "1", "--topic="], "--topic: topic '' is not a valid"),
        (["processor", "-p", "orders", "-v", "1", "--group="], "--group: consumer group '' must match"),
        (["processor", "-p", "orders", "-v", "1", "--dlq-topic=a/b"], "--dlq-topic: topic 'a/b' is not a valid"),
        (["processor", "-p", "orders", "-v", "1", "--late-topic="], "--late-topic: topic '' is not a valid"),
        (["processor", "-p", "orders", "-v", "1", "--instance-id="], "--instance-id / KAPPA_INSTANCE_ID ''"),
        (["processor", "-p", "orders", "-v", "1", "--batch-size=0"], "batch size must be >= 1"),
        (["archiver", "--topic="], "--topic: topic '' is not a valid"),
        (["archiver", "--group="], "--group: consumer group '' must match"),
        (["archiver", "--group-protocol="], "--group-protocol / KAPPA_GROUP_PROTOCOL must be one of"),
        (["produce", "--topic=a b"], "--topic: topic 'a b' is not a valid"),
        (["produce", "--count=-1"], "--count must be >= 0"),
        (["replay", "load", "--day=2026-11-20", "--last-day="], "day '' is not a date"),
        (["replay", "consume", "--day=2026-11-20", "--last-day="], "day '' is not a date"),
        (["promote", "--pipeline=", "--version=2"], "pipeline name '' must match"),
        (["promote", "--version=0"], "version 0 must be a positive integer"),
        (["promote", "--version=2", "--max-unexplained=-1"], "--max-unexplained must be >= 0"),
        (["dashboard", "--port=70000"], "--port must be 1..65535"),
        (["dashboard", "--host="], "--host must not be empty"),
        (["dashboard", "--interval=0"], "--interval must be > 0"),
        (["check", "--timeout=0"], "--timeout must be > 0"),
    ],
)
def test_a_bad_option_fails_in_one_line_before_anything_connects(arguments: list[str], message: str) -> None:
    """Checked against a broker and an S3 that do not exist: the mistake is reported, not the outage,
    and an empty name or day is refused rather than read as "the default"."""
    env = {**os.environ, "KAPPA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "KAPPA_S3_ENDPOINT_URL": "http://127.0.0.1:9",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1"}
    run = subprocess.run([sys.executable, "-m", "workers.cli", *arguments], capture_output=True, text=True,
                         env=env, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith(f"error: {message}"), run.stderr


def test_empty_passthrough_values_are_ignored() -> None:
    assert kafka_passthrough({"KAPPA_KAFKA_CLIENT_ID": "", "OTHER": "x"}) == {}
