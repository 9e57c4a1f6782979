"""Test fixtures: the real local stack (or your cluster), plus per-test buckets and topics.

If ``KAPPA_BOOTSTRAP_SERVERS`` is set in the environment, tests use that cluster and the S3 named
by ``KAPPA_S3_ENDPOINT_URL``/AWS credentials. Otherwise the session runs the suite's own local
stack (``TEST_STACK``: its own folder and ports, apart from the stack ``kappa stack up`` and
``make demo`` use) with the same code as ``kappa stack up``. A session that starts it starts it
empty and stops it at the end; a running one (``KAPPA_KEEP_STACK=1`` before) is reused as it is.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from workers import kafka as kafka_helpers
from workers import s3 as s3_helpers
from workers.config import Settings, apply_stack_env, cache_dir, load_settings
from workers.dev.stack import Stack

#: Decided before any test runs: calling load_settings() copies the local stack's env file into the
#: environment, which must not look like an external cluster.
EXTERNAL_CLUSTER = "KAPPA_BOOTSTRAP_SERVERS" in os.environ

#: The suite's own stack. Sharing the user's stack meant the tests' live processors joined the
#: live consumer groups of a running demo, and every run left its few hundred topics and buckets
#: behind: after a dozen runs Kafka held 10k partitions and took 30 s to start instead of 4.
#: Each one applies only where the environment does not choose already.
TEST_STACK = {
    "KAPPA_STACK_DIR": str(cache_dir() / "test-stack"),
    "KAPPA_STACK_KAFKA_PORT": "29092",
    "KAPPA_STACK_S3_PORT": "29000",
}
#: only the suite's own folder is ever emptied, never a stack the environment names
OWN_STACK_DIR = not EXTERNAL_CLUSTER and "KAPPA_STACK_DIR" not in os.environ
if not EXTERNAL_CLUSTER:
    for _name, _value in TEST_STACK.items():
        os.environ.setdefault(_name, _value)


#: the stack the pytest-xdist controller started, and whether it started it
OWNED_STACK = pytest.StashKey[tuple[Stack, bool]]()


def start_test_stack() -> tuple[Stack, bool]:
    """The suite's stack, running; True when this call started it (empty), False when it ran already."""
    local = Stack(log=lambda message: print(message))
    started = not local.running()
    if started:
        local.down()  # a service left running alone: reset refuses, and up would reuse it
        if OWN_STACK_DIR:
            local.reset()
    local.up()
    return local, started


def stop_test_stack(local: Stack, started: bool) -> None:
    kafka_helpers.drop_admin_clients()
    if started and os.environ.get("KAPPA_KEEP_STACK") != "1":
        local.down()


def runs_xdist_workers(config: pytest.Config) -> bool:
    """This process is the controller of pytest-xdist workers (``make test`` runs ``-n 2``)."""
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist the controller owns the stack: it starts it before any worker and stops it
    after the last, so no worker stops it under another; each worker finds it running."""
    if not EXTERNAL_CLUSTER and runs_xdist_workers(config):
        config.stash[OWNED_STACK] = start_test_stack()


def pytest_unconfigure(config: pytest.Config) -> None:
    owned = config.stash.get(OWNED_STACK, None)
    if owned is not None:
        stop_test_stack(*owned)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack | None]:
    """The running local stack (None when the environment names an external cluster)."""
    if EXTERNAL_CLUSTER:
        yield None
        return
    local, started = start_test_stack()
    apply_stack_env()
    try:
        yield local
    finally:
        stop_test_stack(local, started)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names that never collide between tests or runs: ``unique("events")`` -> ``events-1a2b3c4d``."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(stack: Stack | None, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with a fresh bucket, topic names and group prefix, exported to the environment for
    subprocesses: tests running side by side (pytest-xdist) never share a consumer group."""
    bucket = unique("kappa-test")
    events = unique("events")
    monkeypatch.setenv("KAPPA_GROUP_PREFIX", unique("kappa"))
    monkeypatch.setenv("KAPPA_S3_BUCKET", bucket)
    monkeypatch.setenv("KAPPA_EVENTS_TOPIC", events)
    monkeypatch.setenv("KAPPA_DLQ_TOPIC", f"{events}.dlq")
    current = load_settings()
    s3_helpers.ensure_bucket(s3_helpers.s3_client(current), bucket)
    return current


@pytest.fixture
def s3(settings: Settings):
    return s3_helpers.s3_client(settings)


@pytest.fixture
def topic_factory(settings: Settings, unique: Callable[[str], str]) -> Callable[..., str]:
    def create(prefix: str = "topic", partitions: int = 3) -> str:
        name = unique(prefix)
        kafka_helpers.ensure_topic(settings, name, partitions)
        return name

    return create
