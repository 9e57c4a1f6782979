"""Fast takeover: a worker restarted after ``kill -9`` gets its partitions back at once (static
membership), not after the dead member's session timeout. Measured by ``tests/takeover.py``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from takeover import Worker, takeover_seconds

from workers import kafka as kafka_helpers
from workers.config import Settings
from workers.generator import produce_events

#: long enough that a dynamic member could not take over before it expires (~45 s measured)
SESSION_TIMEOUT = 40


def group_members(settings: Settings, group: str) -> list[tuple[str, str | None]]:
    """(client id, group.instance.id) of each member, from the broker."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_config())
    description = admin.describe_consumer_groups([group])[group].result(timeout=30)
    return [(member.client_id, member.group_instance_id) for member in description.members]


def test_a_killed_archiver_restarted_owns_its_partitions_again_before_its_session_expires(
    settings: Settings, tmp_path: Path, unique
) -> None:
    kafka_helpers.ensure_topic(settings, settings.events_topic, 3)
    group = unique("g")
    args = ["--group", group, "--session-timeout", str(SESSION_TIMEOUT), "--log-interval", "1", "--flush-seconds", "1"]
    env = {**os.environ, "KAPPA_INSTANCE_LOCK_DIR": str(tmp_path / "locks")}
    seen: dict[str, object] = {}

    def check(worker: Worker) -> None:
        seen["members"] = group_members(settings, group)
        produce_events(settings, 300, seed=5, partitions=3)  # and it archives again
        ends = kafka_helpers.end_offsets(settings, settings.events_topic)
        seen["archived"] = worker.wait_owns(set(ends), 5) is not None and wait_archived(worker, sum(ends.values()))

    seconds, kills = takeover_seconds(tmp_path, args, env, 3, timeout=SESSION_TIMEOUT - 5, check=check)
    print(f"takeover after kill -9: {seconds if seconds is None else round(seconds, 1)} s "
          f"(session timeout {SESSION_TIMEOUT} s)")
    assert kills == 1, "the kill did not land"
    assert seconds is not None, "the restarted archiver did not get its partitions back before the session timeout"
    host_id = [instance for _client, instance in seen["members"]]  # type: ignore[attr-defined]
    assert len(host_id) == 1 and host_id[0].startswith("kappa-archiver-"), seen["members"]
    assert seen["archived"]


def wait_archived(worker: Worker, records: int, timeout: float = 60) -> bool:
    """True once the worker's counter line shows ``records`` archived."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"records={records} " in worker.log.read_text():
            return True
        time.sleep(0.3)
    return False
