"""Fast takeover: a worker restarted after ``kill -9`` gets its partitions back at once (static
membership), not after the dead member's session timeout. Measured by ``tests/takeover.py``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from takeover import COMMANDS, Worker, takeover_seconds

from workers import kafka as kafka_helpers
from workers import keys
from workers import s3 as s3_helpers
from workers.config import Settings
from workers.dev.generator import produce_events
from workers.processor.state import list_states

from .invariants import FIGURES, record_figure

#: long enough that a dynamic member could not take over before it expires (~45 s measured)
SESSION_TIMEOUT = 40


def group_members(settings: Settings, group: str, timeout: float = 20.0) -> list[tuple[str, str | None]]:
    """(client id, group.instance.id) of each member, from the broker, once there is one: the
    "assigned" lines a shuffled processor logs are its stage 2's (a group of its own), and its stage 1
    can join ``group`` a moment after them."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_config())
    deadline = time.monotonic() + timeout
    while True:
        # a coordinator still loading is waited out, as the workers do
        description = kafka_helpers.retrying(lambda: admin.describe_consumer_groups([group])[group].result(30), timeout)
        if description.members or time.monotonic() > deadline:
            return [(member.client_id, member.group_instance_id) for member in description.members]
        time.sleep(0.2)


@pytest.mark.parametrize("role", sorted(COMMANDS))
def test_a_killed_worker_restarted_owns_its_partitions_again_before_its_session_expires(
    settings: Settings, tmp_path: Path, unique, role: str
) -> None:
    """Static membership: the restart is the same member, so it needs no rebalance and no other member."""
    kafka_helpers.ensure_topic(settings, settings.events_topic, 3)
    group = unique("g")
    args = [*COMMANDS[role], "--group", group, "--session-timeout", str(SESSION_TIMEOUT)]
    env = {**os.environ, "KAPPA_INSTANCE_LOCK_DIR": str(tmp_path / "locks"), "KAPPA_INSTANCE_ID": "auto"}
    seen: dict[str, Any] = {}

    def check(worker: Worker) -> None:
        seen["members"] = group_members(settings, group)
        produce_events(settings, 300, seed=5, partitions=3)  # and it works again
        seen["working"] = resumed(settings, role, worker)

    seconds, kills = takeover_seconds(tmp_path, args, env, 3, timeout=SESSION_TIMEOUT - 5, check=check)
    print(f"{role} takeover after kill -9: {seconds if seconds is None else round(seconds, 1)} s "
          f"(session timeout {SESSION_TIMEOUT} s)")
    assert kills == 1, "the kill did not land"
    assert seconds is not None, f"the restarted {role} did not get its partitions back before the session timeout"
    FIGURES.fault(f"takeover.{role}", kills=kills, seconds=round(seconds, 2))
    record_figure(f"takeover_s.{role}", seconds)
    instances = [instance for _client, instance in seen["members"]]
    assert len(instances) == 1 and instances[0].startswith(f"kappa-{role}-"), seen["members"]
    assert seen["working"], f"the restarted {role} did not process the new records"


def resumed(settings: Settings, role: str, worker: Worker, timeout: float = 60) -> bool:
    """The archiver archives / the processor counts the 300 records produced after the takeover."""
    client = s3_helpers.s3_client(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if role == "archiver" and "records=300 " in worker.log.read_text():
            return True
        if role == "processor":
            states = list_states(client, settings.s3_bucket, keys.live_prefix("orders", 2))
            if sum(sum(day["records"] for day in state["stats"].values()) for state in states.values()) == 300:
                return True
        time.sleep(0.3)
    return False
