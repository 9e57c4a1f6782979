"""The Quix Streams peer: events and amount per (1-minute window, type) over the same topic as ours.

Runs in its own venv (``benchmarks/.venv-quix``, see ``make bench``) because quixstreams pins
confluent-kafka < 2.13 while the project uses a newer one; so this file imports nothing from the
project. Two topologies (``--mode``):

* ``best`` (the default, the peer of the ratio): the cheapest Quix program that computes the job.
  The topic is keyed by user, so Quix's windows (always per message key) would need a ``group_by``
  repartition topic to count per type. Instead each record updates an in-memory total per
  (window, type) in a plain ``sdf.update`` callback: no repartition topic, no RocksDB, no
  changelog topic (``use_changelog_topics=False`` as well), the JSON deserializer, and the same
  librdkafka fetch tuning as our processor (``--consumer-config``). This is the floor of any Quix
  topology for this job; beating it by N times beats every other configuration by at least N.
* ``windowed`` (information only): idiomatic Quix windows, ``group_by("type")`` (a repartition
  topic), a tumbling event-time window with ``Count`` + ``Sum("amount")`` and ``.current()``,
  RocksDB state without changelog topics.

Timing runs from the first consumed record to the last (``seconds``): Quix's start-up, topic
checks and group join are not in it. Prints one JSON line: records, seconds, per-(window, type)
totals, peak RSS and the internal topics the run created (must be none in ``best``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any

WINDOW_MS = 60_000


class Meter:
    """Counts records, keeps first/last times, stops the app after ``records`` and logs progress."""

    def __init__(self, app: Any, records: int) -> None:
        self.app, self.records = app, records
        self.n, self.first, self.last = 0, 0.0, 0.0
        self.next_report = time.monotonic() + 5

    def tick(self) -> None:
        now = time.monotonic()
        if not self.n:
            self.first = now
        self.n += 1
        if self.n >= self.records:
            self.last = now
            self.app.stop()
        elif now >= self.next_report:
            self.next_report = now + 5
            print(f"quix: {self.n:,} records", file=sys.stderr, flush=True)

    def watchdog(self, idle_s: float) -> None:
        """Stop the app when nothing arrived for ``idle_s`` (a short topic must not hang the bench)."""
        last_n, last_change = -1, time.monotonic()
        while self.n < self.records:
            time.sleep(1)
            if self.n != last_n:
                last_n, last_change = self.n, time.monotonic()
            elif time.monotonic() - last_change > idle_s:
                print(f"quix: idle for {idle_s:.0f}s at {self.n:,} records: stopping", file=sys.stderr)
                self.last = last_change
                self.app.stop()
                return


def best(sdf: Any, meter: Meter, windows: dict[tuple[int, str], list]) -> None:
    """Per-(window, type) totals in process memory: no state store, no internal topic."""

    def add(value: dict, key: object, timestamp: int, headers: object) -> None:
        total = windows.get((timestamp - timestamp % WINDOW_MS, value["type"]))
        if total is None:
            windows[(timestamp - timestamp % WINDOW_MS, value["type"])] = [1, value["amount"]]
        else:
            total[0] += 1
            total[1] += value["amount"]
        meter.tick()

    sdf.update(add, metadata=True)


def windowed(sdf: Any, meter: Meter, windows: dict[tuple[int, str], list], grace_ms: int) -> None:
    """Idiomatic Quix: repartition by type, tumbling window, last ``.current()`` emission = total."""
    from quixstreams.dataframe.windows import Count, Sum

    sdf = sdf.group_by("type")
    sdf = (
        sdf.tumbling_window(timedelta(milliseconds=WINDOW_MS), grace_ms=grace_ms)
        .agg(events=Count(), amount=Sum("amount"))
        .current()
    )

    def collect(value: dict, key: object, timestamp: int, headers: object) -> None:
        name = key.decode() if isinstance(key, bytes) else str(key)
        windows[(value["start"], name)] = [value["events"], value["amount"]]
        meter.tick()

    sdf.update(collect, metadata=True)


def internal_topics(broker: str, group: str) -> list[str]:
    """Topics Quix created for this app (``repartition__<group>--...``, ``changelog__<group>--...``)."""
    from confluent_kafka.admin import AdminClient

    topics = AdminClient({"bootstrap.servers": broker}).list_topics(timeout=30).topics
    return sorted(t for t in topics if t.split("__", 1)[0] in ("repartition", "changelog") and group in t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--mode", choices=("best", "windowed"), default="best")
    # windowed mode only: a replay of a whole day interleaves partitions; two days keep every window open
    parser.add_argument("--grace-ms", type=int, default=2 * 86_400_000)
    parser.add_argument("--consumer-config", default="{}", help="JSON librdkafka settings (our fetch tuning)")
    parser.add_argument("--idle-s", type=float, default=30.0, help="stop when nothing came for this long")
    args = parser.parse_args()

    from quixstreams import Application

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app = Application(
        broker_address=args.broker,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=tempfile.mkdtemp(prefix="quix-bench-"),
        use_changelog_topics=False,
        consumer_extra_config=json.loads(args.consumer_config),
        loglevel="WARNING",
    )
    topic = app.topic(args.topic, value_deserializer="json", key_deserializer="bytes")
    sdf = app.dataframe(topic)
    meter = Meter(app, args.records)
    windows: dict[tuple[int, str], list] = {}
    if args.mode == "best":
        best(sdf, meter, windows)
    else:
        windowed(sdf, meter, windows, args.grace_ms)
    threading.Thread(target=meter.watchdog, args=(args.idle_s,), daemon=True).start()
    started = time.monotonic()
    app.run()
    ended = meter.last or time.monotonic()
    result = {
        "mode": args.mode,
        "records": meter.n,
        "seconds": ended - (meter.first or started),
        "seconds_with_startup": ended - started,
        "windows": [[start, name, events, amount] for (start, name), (events, amount) in sorted(windows.items())],
        "internal_topics": internal_topics(args.broker, args.group),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result["rate"] = result["records"] / result["seconds"] if result["seconds"] > 0 else None
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
