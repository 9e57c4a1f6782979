"""``python -m benchmarks``: options from flags, else ``BENCH_*`` environment variables."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks import report
from benchmarks.runner import ALL_SCENARIOS, Bench, Config, e2e_summary


def _env_int(name: str, default: int) -> int:
    return int(float(os.environ.get(name, default)))


def _sizes(text: str) -> list[int]:
    return sorted({int(float(part)) for part in text.replace("_", "").split(",") if part.strip()})


def parse(argv: list[str] | None = None) -> Config:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Throughput and memory of the workers as ratios to Kafka's perf tools and Quix Streams.",
    )
    parser.add_argument("--runs", type=int, default=_env_int("BENCH_RUNS", 3), help="runs per scenario (BENCH_RUNS)")
    parser.add_argument("--events", type=int, default=_env_int("BENCH_EVENTS", 1_000_000),
                        help="events for scenarios 1-4 (BENCH_EVENTS)")
    parser.add_argument("--quix-events", type=int, default=_env_int("BENCH_QUIX_EVENTS", 100_000),
                        help="events for the Quix Streams comparison, ~5k/s on 2 cores (BENCH_QUIX_EVENTS)")
    parser.add_argument("--memory-sizes", type=_sizes, default=_sizes(env.get("BENCH_MEMORY_SIZES", "1e6,3e6")),
                        help="memory scenario sizes; 1e6,1e7 does not fit 20 min on 2 cores (BENCH_MEMORY_SIZES)")
    parser.add_argument("--scenarios", default=env.get("BENCH_SCENARIOS", ",".join(ALL_SCENARIOS)),
                        help=f"subset of {','.join(ALL_SCENARIOS)} (BENCH_SCENARIOS)")
    parser.add_argument("--e2e-runs", type=int, default=None, help="Dagster runs (BENCH_E2E_RUNS, default 2)")
    parser.add_argument("--value-bytes", type=int, default=_env_int("BENCH_VALUE_BYTES", 200),
                        help="mean JSON value size (BENCH_VALUE_BYTES)")
    parser.add_argument("--partitions", type=int, default=_env_int("BENCH_PARTITIONS", 6))
    parser.add_argument("--replay-partitions", type=int, default=_env_int("BENCH_REPLAY_PARTITIONS", 3))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 100k events, 20k for Quix, memory at 100k and 300k, 2 runs")
    parser.add_argument("--keep", action="store_true", help="keep the bench topics and buckets")
    parser.add_argument("--out", type=Path, default=Path(env.get("BENCH_OUT", Config().out)))
    parser.add_argument("--render", type=Path, default=None,
                        help="only re-render latest.md from this results JSON (no benchmark run)")
    parser.add_argument("--label", default=env.get("BENCH_LABEL", ""), help="a note printed with the results")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; pick from {','.join(ALL_SCENARIOS)}")
    config = Config(
        runs=args.runs, events=args.events, quix_events=args.quix_events, memory_sizes=args.memory_sizes,
        scenarios=scenarios, e2e_runs=args.e2e_runs or _env_int("BENCH_E2E_RUNS", 2),
        value_bytes=args.value_bytes, partitions=args.partitions, replay_partitions=args.replay_partitions,
        keep=args.keep, out=args.out, label=args.label, render=args.render,
    )
    if args.quick:
        config.runs, config.e2e_runs = 2, 1
        config.events, config.quix_events, config.memory_sizes = 100_000, 20_000, [100_000, 300_000]
    if config.runs < 1 or config.events < 1 or len(config.memory_sizes) < 1:
        parser.error("--runs, --events and --memory-sizes must be positive")
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    if config.render:
        results = json.loads(config.render.read_text())
        e2e = results.get("scenarios", {}).get("e2e")
        if e2e and "runs" in e2e:
            results["scenarios"]["e2e"] = e2e_summary(e2e["records"], e2e["runs"])
    else:
        results = Bench(config).run()
    json_path, md_path = report.write(results, config.out)
    print(md_path.read_text())
    print(f"written: {json_path} and {md_path}", file=sys.stderr)
    failed = [name for name, x in results["scenarios"].items() if "error" in x]
    if failed:
        sys.exit(f"scenarios failed: {', '.join(failed)}")
