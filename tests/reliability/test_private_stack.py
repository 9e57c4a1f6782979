"""The private stack restarts one service at a time, like `kappa stack down/up --only`; a stopped stack resets."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers import config as cfg
from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.dev.stack import Layout, Ports, Stack
from workers.errors import StackError

from .conftest import free_port_block


def test_restart_kafka_only_keeps_s3_running(private_stack: Stack, private_settings: Settings) -> None:
    kafka_helpers.ensure_topic(private_settings, "kept", 2)
    assert private_stack.down(["kafka"]) == ["kafka"]
    s3_helpers.check_reachable(private_settings, timeout=5)
    private_stack.up(["kafka"])
    assert kafka_helpers.partition_count(private_settings, "kept") == 2


def test_reset_empties_a_stopped_stack_and_refuses_a_running_one(tmp_path: Path) -> None:
    """`kappa stack reset` (what a test session does to its own stack before starting it): topics and
    objects are gone after the next up, the credentials stay; while a service runs it refuses."""
    kafka = free_port_block(3)
    ports = Ports(kafka=kafka, controller=kafka + 1, kafka_sasl=kafka + 2, s3=free_port_block(1))
    stack = Stack(layout=Layout(root=tmp_path, jars_root=cfg.cache_dir() / "jars"), ports=ports, log=print)
    stack.up()
    try:
        settings = stack.settings()
        kafka_helpers.ensure_topic(settings, "before-reset", 1)
        s3_helpers.s3_client(settings).put_object(Bucket=settings.s3_bucket, Key="before-reset", Body=b"x")
        secrets = stack.layout.secrets_file.read_text()
        with pytest.raises(StackError, match=r"kafka, s3proxy still running in .*: stop the stack first"):
            stack.reset()
        stack.down()
        assert sorted(folder.parent.name for folder in stack.reset()) == ["kafka", "s3proxy"]
        stack.up()
        settings = stack.settings()
        assert "before-reset" not in kafka_helpers.admin_client(settings).list_topics(timeout=30).topics
        assert s3_helpers.get_bytes(s3_helpers.s3_client(settings), settings.s3_bucket, "before-reset") is None
        assert stack.layout.secrets_file.read_text() == secrets
    finally:
        stack.down()
