"""The private stack restarts one service at a time, like `kappa stack down/up --only`; a stopped stack resets."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_stack import TS, consume_all, produce

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


@pytest.mark.slow
def test_down_then_up_keeps_topic_records_and_s3_objects(private_stack: Stack, private_settings: Settings,
                                                          private_s3, unique) -> None:
    """What ``kappa stack down`` then ``up`` keeps: a topic's records and S3 objects (on the private
    stack: the session's shared stack serves tests running side by side)."""
    topic = unique("durable")
    kafka_helpers.ensure_topic(private_settings, topic, 1)
    produce(private_settings, topic, [{"key": b"k", "value": b"kept", "timestamp": TS}])
    private_s3.put_object(Bucket=private_settings.s3_bucket, Key="durable.txt", Body=b"kept")

    stopped = private_stack.down()
    assert set(stopped) == {"kafka", "s3proxy"}
    assert not private_stack.running()
    private_stack.up()

    assert [m.value() for m in consume_all(private_settings, topic, 1, unique("g"))] == [b"kept"]
    assert s3_helpers.get_bytes(s3_helpers.s3_client(private_settings), private_settings.s3_bucket,
                                "durable.txt") == b"kept"


def test_reset_empties_a_stopped_stack_and_refuses_a_running_one(tmp_path: Path) -> None:
    """`kappa stack reset` (what a test session does to its own stack before starting it): topics and
    S3 objects are gone, the next up formats an empty cluster, the credentials stay; while a service
    runs it refuses. Kafka alone is started: S3Proxy's data is a folder like Kafka's."""
    kafka = free_port_block(3)
    ports = Ports(kafka=kafka, controller=kafka + 1, kafka_sasl=kafka + 2, s3=free_port_block(1))
    stack = Stack(layout=Layout(root=tmp_path, jars_root=cfg.cache_dir() / "jars"), ports=ports, log=print)
    stack.up(["kafka"])
    try:
        settings = Settings(bootstrap_servers=stack.bootstrap)
        kafka_helpers.ensure_topic(settings, "before-reset", 1)
        s3_object = stack.layout.service_dir("s3proxy") / "data" / "kappa" / "before-reset"
        s3_object.parent.mkdir(parents=True)
        s3_object.write_bytes(b"x")
        secrets = stack.layout.secrets_file.read_text()
        with pytest.raises(StackError, match=r"^kafka still running in .*: stop the stack first"):
            stack.reset()
        stack.down()
        assert sorted(folder.parent.name for folder in stack.reset()) == ["kafka", "s3proxy"]
        assert not s3_object.exists()
        stack.up(["kafka"])
        assert "before-reset" not in kafka_helpers.admin_client(settings).list_topics(timeout=30).topics
        assert stack.layout.secrets_file.read_text() == secrets
    finally:
        stack.down()
