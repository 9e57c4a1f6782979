"""The local stack is real: Kafka and S3 round trips, data survives down/up, clear errors when down."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import dagster as dg
import pytest
from confluent_kafka import Consumer, Producer

from kappa_dagster.defs.resources import KappaResource, build_resources
from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.dev.stack import Stack
from workers.errors import UnreachableError

TS = 1_763_600_000_123


def produce(settings: Settings, topic: str, records: list[dict]) -> None:
    producer = Producer(settings.kafka_config())
    for record in records:
        producer.produce(topic, **record)
    assert producer.flush(30) == 0


def consume_all(settings: Settings, topic: str, count: int, group: str) -> list:
    consumer = Consumer(settings.kafka_config(**{"group.id": group, "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    messages, deadline = [], time.monotonic() + 60
    try:
        while len(messages) < count and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=count, timeout=1):
                assert message.error() is None, message.error()
                messages.append(message)
    finally:
        consumer.close()
    return messages


def test_kafka_round_trip_keeps_key_value_headers_timestamp(settings: Settings, topic_factory, unique) -> None:
    topic = topic_factory("roundtrip", partitions=1)
    records = [
        {"key": b"user-1", "value": b'{"a": 1}', "headers": [("h1", b"v1"), ("h2", b"\xff\x00")], "timestamp": TS},
        {"key": None, "value": b"\x80not-utf8", "headers": [], "timestamp": TS + 1},
        {"key": b"k", "value": None, "timestamp": TS + 2},
    ]
    produce(settings, topic, records)
    got = consume_all(settings, topic, 3, unique("g"))
    assert [m.key() for m in got] == [b"user-1", None, b"k"]
    assert [m.value() for m in got] == [b'{"a": 1}', b"\x80not-utf8", None]
    assert got[0].headers() == [("h1", b"v1"), ("h2", b"\xff\x00")]
    assert not got[1].headers()
    assert [m.timestamp()[1] for m in got] == [TS, TS + 1, TS + 2]


def test_s3_put_get_list_with_boto3(settings: Settings, s3) -> None:
    s3.put_object(Bucket=settings.s3_bucket, Key="raw/a/one.bin", Body=b"\x00\x01")
    s3.put_object(Bucket=settings.s3_bucket, Key="raw/a/two.bin", Body=b"two")
    keys = [o["Key"] for o in s3_helpers.iter_keys(s3, settings.s3_bucket, "raw/a/")]
    assert keys == ["raw/a/one.bin", "raw/a/two.bin"]
    assert s3_helpers.get_bytes(s3, settings.s3_bucket, "raw/a/one.bin") == b"\x00\x01"
    assert s3_helpers.get_bytes(s3, settings.s3_bucket, "raw/a/missing") is None


def test_s3proxy_logs_no_debug_lines(stack: Stack | None, settings: Settings, s3) -> None:
    """logback's default (no configuration in the jar) is DEBUG: every request then paid for Jetty's
    debug strings, most of S3Proxy's CPU, and its log grew by gigabytes a day."""
    if stack is None:
        pytest.skip("the local stack's own S3Proxy")
    for n in range(20):
        s3.put_object(Bucket=settings.s3_bucket, Key=f"quiet/{n}", Body=b"x" * 1000)
    log = stack.layout.log_file("s3proxy")
    with open(log, "rb") as file:
        file.seek(max(0, log.stat().st_size - 256 * 1024))
        tail = file.read()
    assert b" DEBUG " not in tail, f"S3Proxy logs at DEBUG ({log}): restart the stack with this code"


def test_s3_through_the_dagster_resource(settings: Settings) -> None:
    resource: KappaResource = build_resources()["kappa"]
    seen = {}

    @dg.asset
    def writes_and_reads(kappa: KappaResource) -> None:
        client = kappa.s3_client()
        client.put_object(Bucket=settings.s3_bucket, Key="dagster/hello.txt", Body=b"hi")
        seen["body"] = client.get_object(Bucket=settings.s3_bucket, Key="dagster/hello.txt")["Body"].read()

    assert dg.materialize([writes_and_reads], resources={"kappa": resource}).success
    assert seen["body"] == b"hi"


def test_anonymous_s3_request_is_refused(settings: Settings) -> None:
    import urllib.error
    import urllib.request

    if not settings.s3_endpoint_url:
        pytest.skip("only meaningful against the local S3 server")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{settings.s3_endpoint_url}/{settings.s3_bucket}?list-type=2", timeout=10)
    assert refused.value.code == 403


def test_unreachable_broker_fails_fast_with_a_clear_error() -> None:
    """A refused connection: librdkafka finds every broker down, and the check says so at once."""
    with pytest.raises(UnreachableError, match=r"127\.0\.0\.1:1: every broker is down"):
        kafka_helpers.check_reachable(Settings(bootstrap_servers="127.0.0.1:1"), timeout=60)


def test_a_broker_that_never_answers_fails_at_the_timeout() -> None:
    """A port that accepts connections but never answers (a hung broker): the timeout path."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes connections; nobody reads or answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(UnreachableError, match=rf"{re.escape(address)}: no answer within 2s"):
            kafka_helpers.check_reachable(Settings(bootstrap_servers=address), timeout=2)


def test_cli_reports_unreachable_broker_in_one_line(tmp_path) -> None:
    env = {"KAPPA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAPPA_NO_STACK_ENV": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "check", "--timeout", "3"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "every broker is down" in result.stderr
