"""S3 outage (private stack): the S3 server is stopped mid-flush while records keep arriving.

Each outage asserts it landed: the worker was running and logged S3 failures while S3 was down.

Workers must retry with growing backoff, pause consumption instead of buffering without bound (the
archiver's buffered record count and RSS are sampled during the outage), resume on their own when S3
is back, and lose nothing. Default outage 10 s; the soak variant stops S3 for 30 s.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from typing import Any

import pytest

from workers import keys
from workers.config import Settings
from workers.dev.stack import Stack

from .harness import (
    ARCHIVER_ARGS,
    LIVE_ARGS,
    S3_DOWN_LINES,
    Worker,
    Workers,
    outage,
    produce_orders,
    wait_archived,
    wait_processor_caught_up,
)
from .invariants import assert_archive_exact, assert_dlq_exact, assert_live_exact

PARTITIONS = 3
RATE = 2000  # records/s produced while S3 is down
#: What the archiver may hold per partition while S3 is down: one flush in flight, one more flush's
#: worth buffered (then the partition pauses until the flight lands) and one consume batch.
BUFFER_BOUND = PARTITIONS * (2 * int(ARCHIVER_ARGS[2]) + int(ARCHIVER_ARGS[6]))
RSS_GROWTH_BOUND_KB = 150 * 1024
OUTAGES = [pytest.param(10, id="10s"), pytest.param(30, id="30s", marks=pytest.mark.soak)]


def logged(text: str, name: str) -> list[int]:
    """Every ``name=<int>`` value of the archiver's counter log lines in ``text``, in order."""
    return [int(v) for v in re.findall(rf"\b{name}=(\d+)", text)]


def s3_down_while_producing(stack: Stack, settings: Settings, worker: Worker, seconds: int, kind: str) -> str:
    """Keep producing at ``RATE`` while S3 is stopped for ``seconds``; sample ``worker``'s RSS meanwhile.

    The outage asserts it landed: ``worker`` logged S3 failures while S3 was down. Returns what
    ``worker`` logged during the outage.
    """
    feeder = threading.Thread(target=produce_orders, args=(settings, RATE * (seconds + 6), 12),
                              kwargs={"partitions": PARTITIONS, "rate": RATE})
    feeder.start()
    time.sleep(2)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            worker.rss_kb()
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return outage(stack, "s3proxy", seconds, kind, worker, S3_DOWN_LINES).log
    finally:
        stop.set()
        sampler.join()
        feeder.join(timeout=seconds + 60)


def stop_cleanly(*running: Worker) -> None:
    for worker in running:
        worker.signal(signal.SIGTERM)
        assert worker.wait(120) == 0, worker.tail()


@pytest.mark.parametrize("seconds", OUTAGES)
def test_archiver_pauses_and_backs_off_during_s3_outage(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers, seconds: int
) -> None:
    produce_orders(private_settings, 5_000, 11, partitions=PARTITIONS)
    archiver = workers.start("archiver", *ARCHIVER_ARGS)
    wait_archived(private_settings, private_s3, worker=archiver)
    baseline_kb = archiver.rss_kb()
    during = s3_down_while_producing(private_stack, private_settings, archiver, seconds, "s3_outage.archiver")
    assert archiver.alive(), f"archiver died during the S3 outage:\n{archiver.tail()}"

    buffered, consumed = logged(during, "buffered"), logged(during, "consumed")
    assert buffered, f"no counter lines logged during the outage:\n{archiver.tail()}"
    assert max(buffered) <= BUFFER_BOUND, f"archiver buffered {max(buffered)} records (bound {BUFFER_BOUND})"
    assert consumed[-1] - consumed[0] <= BUFFER_BOUND, "the archiver kept consuming while S3 was down"
    assert archiver.peak_rss_kb - baseline_kb <= RSS_GROWTH_BOUND_KB, (baseline_kb, archiver.peak_rss_kb)
    backoffs = [float(v) for v in re.findall(r"retry in ([\d.]+)s", during)]
    assert backoffs and max(backoffs) >= 2, f"no growing backoff in the archiver log: {backoffs[:10]}"
    assert len(backoffs) <= PARTITIONS * (seconds + 2), f"{len(backoffs)} S3 retries: hammering, not backing off"

    wait_archived(private_settings, private_s3, timeout=180, worker=archiver)
    stop_cleanly(archiver)
    assert_archive_exact(private_settings, private_s3)


@pytest.mark.parametrize("seconds", OUTAGES)
def test_live_processor_survives_s3_outage(
    private_stack: Stack, private_settings: Settings, private_s3: Any, workers: Workers, seconds: int
) -> None:
    produce_orders(private_settings, 5_000, 13, partitions=PARTITIONS)
    live = workers.start("live", *LIVE_ARGS)
    prefix = keys.live_prefix("orders", 2)
    wait_processor_caught_up(private_settings, private_s3, prefix, private_settings.events_topic, worker=live)
    s3_down_while_producing(private_stack, private_settings, live, seconds, "s3_outage.processor.live")
    assert live.alive(), f"live processor died during the S3 outage:\n{live.tail()}"
    topic = private_settings.events_topic
    wait_processor_caught_up(private_settings, private_s3, prefix, topic, timeout=180, worker=live)
    stop_cleanly(live)
    workers.run("archiver", *ARCHIVER_ARGS, "--until-end")
    assert_archive_exact(private_settings, private_s3)
    assert_live_exact(private_settings, private_s3, version=2)
    assert_dlq_exact(private_settings, private_s3, private_settings.dlq_topic)
