"""The Quix Streams peer: the same 1-minute windowed count/sum by `type` over the same topic.

Runs in its own venv (``benchmarks/.venv-quix``, see ``make bench``) because quixstreams pins
confluent-kafka < 2.13 while the project uses a newer one; so this file imports nothing from the
project. Idiomatic Quix: JSON deserializer, ``group_by("type")`` (Quix windows are per message key,
so it repartitions through an internal topic), a tumbling event-time window with a grace period,
``Count`` and ``Sum("amount")``, RocksDB state with changelog topics (Quix defaults).

``.current()`` emits the window after every record, so the last emission per (window, type) is
its total; the run stops after exactly ``--records`` emissions. Prints one JSON line:
records, seconds (from the first record to the last), per-window totals, peak RSS.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--records", type=int, required=True)
    # Replaying a topic from the beginning interleaves whole partitions (a day each): a grace of two
    # days keeps every window open, so Quix counts every record, as our bounded replay does.
    parser.add_argument("--grace-ms", type=int, default=2 * 86_400_000)
    parser.add_argument("--idle-s", type=float, default=30.0, help="stop when nothing came for this long")
    parser.add_argument("--no-changelog", action="store_true")
    args = parser.parse_args()

    from quixstreams import Application
    from quixstreams.dataframe.windows import Count, Sum

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    state_dir = tempfile.mkdtemp(prefix="quix-bench-")
    app = Application(
        broker_address=args.broker,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        use_changelog_topics=not args.no_changelog,
        loglevel="WARNING",
    )
    topic = app.topic(args.topic, value_deserializer="json", key_deserializer="bytes")
    sdf = app.dataframe(topic)
    sdf = sdf.group_by("type")
    sdf = (
        sdf.tumbling_window(timedelta(minutes=1), grace_ms=args.grace_ms)
        .agg(events=Count(), amount=Sum("amount"))
        .current()
    )
    windows: dict[tuple[int, str], tuple[int, float]] = {}
    seen = {"n": 0, "first": 0.0, "last": 0.0, "next_report": time.monotonic() + 5}

    def collect(value: dict, key: object, timestamp: int, headers: object) -> None:
        now = time.monotonic()
        if not seen["n"]:
            seen["first"] = now
        seen["n"] += 1
        name = key.decode() if isinstance(key, bytes) else str(key)
        windows[(value["start"], name)] = (value["events"], value["amount"])
        if seen["n"] >= args.records:
            seen["last"] = now
            app.stop()
        elif now >= seen["next_report"]:
            seen["next_report"] = now + 5
            print(f"quix: {seen['n']:,} records", file=sys.stderr, flush=True)

    sdf.update(collect, metadata=True)

    def watchdog() -> None:
        last_n, last_change = -1, time.monotonic()
        while seen["n"] < args.records:
            time.sleep(1)
            if seen["n"] != last_n:
                last_n, last_change = seen["n"], time.monotonic()
            elif time.monotonic() - last_change > args.idle_s:
                print(f"quix: idle for {args.idle_s:.0f}s at {seen['n']:,} records: stopping", file=sys.stderr)
                seen["last"] = last_change
                app.stop()
                return

    threading.Thread(target=watchdog, daemon=True).start()
    started = time.monotonic()
    app.run()
    ended = seen["last"] or time.monotonic()
    result = {
        "records": seen["n"],
        "seconds": ended - started,
        "seconds_first_to_last": ended - (seen["first"] or started),
        "windows": [[start, name, events, amount] for (start, name), (events, amount) in sorted(windows.items())],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result["rate"] = result["records"] / result["seconds"] if result["seconds"] > 0 else None
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
