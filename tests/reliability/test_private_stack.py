"""The private stack restarts one service at a time, like `kappa stack down/up --only`."""

from __future__ import annotations

from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.dev.stack import Stack


def test_restart_kafka_only_keeps_s3_running(private_stack: Stack, private_settings: Settings) -> None:
    kafka_helpers.ensure_topic(private_settings, "kept", 2)
    assert private_stack.down(["kafka"]) == ["kafka"]
    s3_helpers.check_reachable(private_settings, timeout=5)
    private_stack.up(["kafka"])
    assert kafka_helpers.partition_count(private_settings, "kept") == 2
