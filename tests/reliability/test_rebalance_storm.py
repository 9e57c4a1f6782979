"""Rebalance storm: three live processors in one consumer group, stopped and restarted over and over.

Members are stopped with SIGTERM (clean revoke + checkpoint) or SIGKILL (session timeout, partitions
taken over from the S3 checkpoint), chosen by a seeded RNG while records keep arriving. Afterwards
one member drains the topic and the live results, the DLQ and the archive must be exact.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from workers.config import Settings

from .harness import LIVE_ARGS, Worker, Workers, archive_all, drain_live, produce_orders, sigkill, wait_ready
from .invariants import FIGURES, assert_archive_exact, assert_dlq_exact, assert_live_exact

MEMBERS = 3
RATE = 1500


def stop_member(victim: Worker, signum: int, kind: str | None = None, **detail: object) -> None:
    """Stop a consuming member and assert the stop landed; SIGTERM must end in a clean exit 0.

    The member is first given time (bounded) to start consuming: a SIGTERM during interpreter
    start-up, before the processor installs its handlers, is an ordinary kill. SIGKILL goes through
    :func:`sigkill` (alive when signalled, exit -9); SIGTERM must find the member alive and exit 0.
    """
    wait_ready(victim, "records=", timeout=90)
    if signum == signal.SIGKILL:
        sigkill(victim, kind or "rebalance.sigkill", **detail)
        return
    victim.signal(signum)
    code = victim.wait(60)
    assert code == 0, f"{victim.name} did not stop cleanly on SIGTERM (exit {code}):\n{victim.tail()}"
    if kind is not None:  # a fault of the storm (the final clean stops are not)
        FIGURES.fault(kind, exit=code, **detail)


@pytest.mark.parametrize("rounds", [pytest.param(3, id="3-rounds"),
                                    pytest.param(20, id="20-rounds", marks=pytest.mark.soak)])
def test_three_processors_stopped_and_restarted_repeatedly(
    settings: Settings, s3, workers: Workers, seed: int, rounds: int
) -> None:
    rng = random.Random(seed)
    produce_orders(settings, 10_000, seed, partitions=6)
    feeder = threading.Thread(target=produce_orders, args=(settings, RATE * rounds * 3, seed + 1),
                              kwargs={"partitions": 6, "rate": RATE})
    feeder.start()
    members: list[Worker] = []
    for point in range(rounds):
        for member in members:
            assert member.alive(), f"{member.name} died on its own:\n{member.tail()}"
        while len(members) < MEMBERS:
            members.append(workers.start(f"member-{point}-{len(members)}", *LIVE_ARGS))
        time.sleep(rng.uniform(1.0, 3.0))
        victim = members.pop(rng.randrange(MEMBERS))
        signum = rng.choice([signal.SIGTERM, signal.SIGKILL])
        kind = f"rebalance.{signal.Signals(signum).name.lower()}"
        stop_member(victim, signum, kind, seed=seed, point=point, member=victim.name)
        print(f"[reliability] {kind} #{point}: {victim.name} (seed {seed})")
    feeder.join(timeout=120)
    for member in members:
        stop_member(member, signal.SIGTERM)
    drain_live(workers, settings, s3, "member-final")
    archive_all(workers)
    assert_archive_exact(settings, s3)
    assert_live_exact(settings, s3, version=2)
    assert_dlq_exact(settings, s3, settings.dlq_topic)
