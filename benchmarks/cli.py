"""``python -m benchmarks``: options from flags, else ``BENCH_*`` environment variables."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from benchmarks import report
from benchmarks.runner import (
    ALL_SCENARIOS,
    DEFAULT_SCENARIOS,
    PROCESSOR_VARIANTS,
    QUIX_TARGETS,
    Bench,
    Config,
    e2e_summary,
)


def _env_int(name: str, default: int) -> int:
    return int(float(os.environ.get(name, default)))


def _sizes(text: str) -> list[int]:
    return sorted({int(float(part)) for part in text.replace("_", "").split(",") if part.strip()})


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _check_names(parser: argparse.ArgumentParser, option: str, names: list[str], known: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"{option}: unknown {unknown}; pick from {','.join(known)}")


def parse(argv: list[str] | None = None) -> Config:
    env, default = os.environ, Config()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Throughput and memory of the workers as ratios to Kafka's perf tools and Quix Streams.",
    )
    parser.add_argument("--runs", type=int, default=_env_int("BENCH_RUNS", default.runs),
                        help="runs per scenario; every ratio is min/median/max of these (BENCH_RUNS)")
    parser.add_argument("--events", type=int, default=_env_int("BENCH_EVENTS", default.events),
                        help="events for scenarios 1-4 and the Quix peer (BENCH_EVENTS)")
    parser.add_argument("--memory-sizes", type=_sizes,
                        default=_sizes(env.get("BENCH_MEMORY_SIZES", ",".join(map(str, default.memory_sizes)))),
                        help="memory scenario sizes, smallest vs largest (BENCH_MEMORY_SIZES)")
    parser.add_argument("--memory-value-bytes", type=int,
                        default=_env_int("BENCH_MEMORY_VALUE_BYTES", default.memory_value_bytes),
                        help="mean JSON value size of the memory datasets, all sizes alike (BENCH_MEMORY_VALUE_BYTES)")
    parser.add_argument("--scenarios", type=_names, default=_names(env.get("BENCH_SCENARIOS", ",".join(
        DEFAULT_SCENARIOS))), help=f"subset of {','.join(ALL_SCENARIOS)} (BENCH_SCENARIOS; "
                                   "`make bench-memory` runs memory)")
    parser.add_argument("--processor-variants", type=_names,
                        default=_names(env.get("BENCH_PROCESSOR_VARIANTS", ",".join(PROCESSOR_VARIANTS))),
                        help=f"processor rows, of {','.join(PROCESSOR_VARIANTS)}; one this commit cannot run is "
                             "skipped with the reason (BENCH_PROCESSOR_VARIANTS)")
    parser.add_argument("--quix-modes", type=_names, default=_names(env.get("BENCH_QUIX_MODES", "best")),
                        help=f"Quix peer topologies, of {','.join(QUIX_TARGETS)}; '' for none (BENCH_QUIX_MODES)")
    parser.add_argument("--e2e-runs", type=int, default=_env_int("BENCH_E2E_RUNS", default.e2e_runs),
                        help="Dagster runs (BENCH_E2E_RUNS)")
    parser.add_argument("--value-bytes", type=int, default=_env_int("BENCH_VALUE_BYTES", default.value_bytes),
                        help="mean JSON value size (BENCH_VALUE_BYTES)")
    parser.add_argument("--partitions", type=int, default=_env_int("BENCH_PARTITIONS", default.partitions))
    parser.add_argument("--replay-partitions", type=int,
                        default=_env_int("BENCH_REPLAY_PARTITIONS", default.replay_partitions))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 100k events, 2 runs, memory at 100k and 300k; labelled as such")
    parser.add_argument("--keep", action="store_true", help="keep the bench topics and buckets")
    parser.add_argument("--out", type=Path, default=Path(env.get("BENCH_OUT", default.out)))
    parser.add_argument("--render", type=Path, default=None,
                        help="only re-render latest.md and the chart from this results JSON (no benchmark run)")
    parser.add_argument("--label", default=env.get("BENCH_LABEL", ""), help="a note printed with the results")
    args = parser.parse_args(argv)
    _check_names(parser, "--scenarios", args.scenarios, ALL_SCENARIOS)
    _check_names(parser, "--processor-variants", args.processor_variants, PROCESSOR_VARIANTS)
    _check_names(parser, "--quix-modes", args.quix_modes, QUIX_TARGETS)
    config = Config(
        runs=args.runs, events=args.events, memory_sizes=args.memory_sizes,
        memory_value_bytes=args.memory_value_bytes, scenarios=args.scenarios,
        processor_variants=args.processor_variants, quix_modes=args.quix_modes, e2e_runs=args.e2e_runs,
        value_bytes=args.value_bytes, partitions=args.partitions, replay_partitions=args.replay_partitions,
        keep=args.keep, out=args.out, label=args.label, quick=args.quick, render=args.render,
    )
    if args.quick:
        config.runs, config.e2e_runs = 2, 1
        config.events, config.memory_sizes = 100_000, [100_000, 300_000]
        config.label = " ".join(["QUICK VALIDATION RUN (not the official figures).", config.label]).strip()
    if config.runs < 1 or config.events < 1 or config.e2e_runs < 1 or not config.memory_sizes:
        parser.error("--runs, --events, --e2e-runs and --memory-sizes must be positive")
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    if config.render:
        results = json.loads(config.render.read_text())
        e2e = results.get("scenarios", {}).get("e2e")
        if e2e and "runs" in e2e:  # recomputed from the raw runs (keeps where they come from)
            results["scenarios"]["e2e"] = {**e2e, **e2e_summary(e2e["records"], e2e["runs"])}
    else:
        results = report.merge(report.previous(config.out), Bench(config).run())
    json_path, md_path, chart_path = report.write(results, config.out)
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path} and {chart_path}", file=sys.stderr)
    failed = [name for name, x in results["scenarios"].items() if "error" in x]
    if failed:
        sys.exit(f"scenarios failed: {', '.join(failed)}")
