"""The scenarios. Each runs ``runs`` times; in every run ours and the reference run back to back
(order alternating between runs), so the pairwise ratio cancels most of the machine's noise.

Everything lives in names of its own, removed at the end unless ``--keep``: topics
``bench.<id>.*``, buckets ``kbench-<id>*``, consumer groups ``bench.<id>.*``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import dataset, kafka_tools, machine, procs
from benchmarks.procs import say
from benchmarks.stats import ratios, summary
from workers import kafka as kafka_helpers
from workers.config import Settings, load_settings

ALL_SCENARIOS = ("load", "processor", "archiver", "e2e", "memory")
#: `make bench`: the ratios. `make bench-memory` runs "memory" (1M and 10M events do not fit 20 minutes with them).
DEFAULT_SCENARIOS = ("load", "processor", "archiver", "e2e")
MIB = 1024 * 1024


@dataclass(frozen=True)
class ProcessorVariant:
    """One processor row of scenario 2. Data, so a variant that needs a later commit is one entry here.

    ``needs``: conditions that must hold at this commit, else the row is skipped with the reason:
    ``"attr:X"`` = the pipeline class declares a truthy ``X``; ``"kwarg:X"`` = ``run_processor``
    accepts the keyword ``X``. ``unless``: the same conditions, any of which skips the row.
    """

    name: str
    label: str
    pipeline: str
    version: int
    target: float | None = None  # vs ConsumerPerformance; None = an information row
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra run_processor keyword arguments
    needs: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    quix: bool = False  # the variant compared with the Quix peer (same work: counts every record)


PROCESSOR_VARIANTS: dict[str, ProcessorVariant] = {v.name: v for v in (
    ProcessorVariant("v1", "orders v1 (counts every record)", "orders", 1, target=0.5, quix=True),
    # v2 as it was before issue 12 (dedup per partition, no shuffle): only at commits where v2 has no
    # state key. Since v2 declares one, running v2 is the shuffle: the next row.
    ProcessorVariant("v2", "orders v2 (dedup per input partition)", "orders", 2, unless=("attr:state_key",)),
    ProcessorVariant("v2-shuffle", "orders v2 with its shuffle (state keyed by event_id, two stages)",
                     "orders", 2, needs=("attr:state_key",)),
)}
#: Quix peer topologies (quix_peer.py --mode); the target applies to the processor's ``quix`` variant.
QUIX_TARGETS: dict[str, float | None] = {"best": 5.0, "windowed": None}
#: memory rows: component -> the path it belongs to
MEMORY_COMPONENTS = {"archiver": "live", "processor live": "live", "loader": "bounded",
                     "processor bounded": "bounded"}
MEMORY_VERSION = 2  # the version the Dagster job replays


def _condition(variant: ProcessorVariant, condition: str) -> bool:
    import inspect

    from workers.pipelines import get_pipeline
    from workers.processor import engine as processor

    kind, _, name = condition.partition(":")
    if kind == "attr":
        return bool(getattr(get_pipeline(variant.pipeline, variant.version), name, None))
    if kind == "kwarg":
        return name in inspect.signature(processor.run_processor).parameters
    raise ValueError(f"unknown variant condition {condition!r} (attr:NAME or kwarg:NAME)")


def variant_unavailable(variant: ProcessorVariant) -> str | None:
    """Why ``variant`` cannot run at this commit, or None."""
    missing = [c for c in variant.needs if not _condition(variant, c)]
    if missing:
        return f"not available at this commit ({', '.join(missing)} missing)"
    present = [c for c in variant.unless if _condition(variant, c)]
    if present:
        return f"superseded at this commit ({', '.join(present)} present: see the other v{variant.version} row)"
    for key in variant.kwargs:
        if not _condition(variant, f"kwarg:{key}"):
            return f"not available at this commit (run_processor has no {key!r} argument)"
    return None


@dataclass
class Config:
    runs: int = 5
    events: int = 1_000_000
    memory_sizes: list[int] = field(default_factory=lambda: [1_000_000, 10_000_000])
    memory_value_bytes: int = 100
    scenarios: list[str] = field(default_factory=lambda: list(DEFAULT_SCENARIOS))
    processor_variants: list[str] = field(default_factory=lambda: list(PROCESSOR_VARIANTS))
    quix_modes: list[str] = field(default_factory=lambda: ["best"])
    e2e_runs: int = 3
    value_bytes: int = 200
    partitions: int = 6
    replay_partitions: int = 3
    keep: bool = False
    out: Path = Path(__file__).resolve().parent / "results"
    label: str = ""
    quick: bool = False
    render: Path | None = None  # only re-render latest.md (and the chart) from this JSON


def _show_child(line: str) -> bool:
    """Which lines of a child's stderr are worth echoing as progress."""
    markers = ("loader produce", "loader sort: ", "quix:", "records=", "processor live", "Traceback")
    return any(marker in line for marker in markers)


def alternate(run: int, steps: list[Callable[[], None]]) -> None:
    """Run the steps in order on even runs and reversed on odd ones, so no side always goes first."""
    for step in steps if run % 2 == 0 else reversed(steps):
        step()


class Bench:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings: Settings = load_settings()
        self.id = "b" + dt.datetime.now(dt.UTC).strftime("%m%d%H%M%S")
        self.day = dataset.bench_day()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"kappa-bench-{self.id}-"))
        self.buckets: list[str] = []
        self.results: dict[str, Any] = {"scenarios": {}}
        self.archive_bucket: str | None = None
        self.replay: dict[str, Any] | None = None  # the main dataset's replay topic (loader result)
        self.main: dataset.Dataset | None = None

    # ------------------------------------------------------------------ helpers

    def topic(self, name: str) -> str:
        return f"bench.{self.id}.{name}"

    def bucket(self, name: str) -> str:
        bucket = f"kbench-{self.id}-{name}"
        self.buckets.append(bucket)
        return bucket

    def child(self, component: str, label: str, **options: Any) -> dict[str, Any]:
        command = [sys.executable, "-m", "benchmarks.child", component, json.dumps(options)]
        done = procs.run(command, label=label, show=_show_child, timeout=3600)
        result = done.result_json()
        if result.get("records") is None:
            raise RuntimeError(f"{label}: no record count in {result}")
        return result

    def make_dataset(self, name: str, records: int, value_bytes: int | None = None) -> dataset.Dataset:
        topic, value_bytes = self.topic(name), value_bytes or self.config.value_bytes
        say(f"dataset: producing {records:,} events (~{value_bytes} B values) to {topic}")
        data = dataset.produce(
            self.settings, topic, records, day=self.day, partitions=self.config.partitions,
            value_bytes=value_bytes,
            progress=lambda n, s: say(f"  dataset: {n:,}/{records:,} ({n / s:,.0f}/s)"),
        )
        say(f"dataset: {records:,} events in {data.seconds:.1f}s, mean value {data.mean_value_bytes:.0f} B")
        return data

    def archive(self, data: dataset.Dataset, bucket: str, label: str) -> dict[str, Any]:
        result = self.child("archiver", label, topic=data.topic, group=f"bench.{self.id}.{label}", bucket=bucket)
        if result["records"] != data.records:
            raise RuntimeError(f"{label}: archived {result['records']} of {data.records} records")
        return result

    def load_day(self, label: str, topic: str, bucket: str) -> dict[str, Any]:
        """The replay loader over the bench day of ``topic``'s archive, in its own process."""
        return self.child("loader", label, topic=topic, day=self.day, bucket=bucket,
                          partitions=self.config.replay_partitions)

    def processor_child(self, label: str, topic: str, group: str, bucket: str, records: int,
                        **options: Any) -> dict[str, Any]:
        """A processor run in its own process that must have processed every record."""
        r = self.child("processor", label, topic=topic, group=group, bucket=bucket, records=records, **options)
        if r["records"] != records or not r["complete"]:
            raise RuntimeError(f"{label}: processed {r['records']} of {records} records")
        return r

    def consumer_reference(self, scenario: str, topic: str, records: int, run: int) -> float:
        """Kafka's ConsumerPerformance over ``topic`` with a new group: the reference rate of a run."""
        r = kafka_tools.consumer_performance(self.settings.bootstrap_servers, topic, records,
                                             f"bench.{self.id}.cp-{scenario}{run}", "ConsumerPerformance")
        say(f"{scenario} run {run + 1}: ConsumerPerformance {r.records_per_s:,.0f} rec/s")
        return r.records_per_s

    # ------------------------------------------------------------------ run all

    def run(self) -> dict[str, Any]:
        config = self.config
        started = time.monotonic()
        self.results["meta"] = {
            **machine.describe(),
            "run_id": self.id,
            "label": config.label,
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "load_average_start": machine.load_average(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "day": self.day,
        }
        say(f"bench {self.id}: scenarios {', '.join(config.scenarios)}; {config.runs} runs; "
            f"{config.events:,} events; memory sizes {', '.join(f'{s:,}' for s in config.memory_sizes)}")
        try:
            if set(config.scenarios) - {"memory"}:  # the memory scenario makes datasets of its own
                self.main = self.make_dataset("events", config.events)
                self.results["dataset"] = self.main.as_dict()
            steps = [("archiver", self.scenario_archiver), ("load", self.scenario_load),
                     ("processor", self.scenario_processor), ("e2e", self.scenario_e2e),
                     ("memory", self.scenario_memory)]
            for name, step in steps:
                if name in config.scenarios:
                    say(f"=== scenario {name}")
                    try:
                        step()
                        self.results["scenarios"][name]["provenance"] = self.provenance(name)
                    except Exception as exc:  # keep the other scenarios' results
                        say(f"scenario {name} FAILED: {type(exc).__name__}: {str(exc)[:2000]}")
                        self.results["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"[:4000],
                                                           "provenance": self.provenance(name)}
        finally:
            if not config.keep:
                self.cleanup()
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
        self.results["meta"]["load_average_end"] = machine.load_average()
        return self.results

    def provenance(self, scenario: str) -> dict[str, Any]:
        """Which run and commit a scenario's figures come from (sections of latest.json can come from
        different runs: `make bench` and `make bench-memory`)."""
        meta, config = self.results["meta"], self.config
        runs, events = {"memory": (1, config.memory_sizes), "e2e": (config.e2e_runs, [config.events])}.get(
            scenario, (config.runs, [config.events]))
        return {"run_id": self.id, "commit": meta["commit"]["short"], "dirty": meta["commit"]["dirty"],
                "started_at": meta["started_at"], "runs": runs, "events": events, "quick": config.quick,
                "label": config.label}

    def main_dataset(self) -> dataset.Dataset:
        """The dataset every scenario but memory measures (made once by :meth:`run`)."""
        if self.main is None:
            raise RuntimeError("no main dataset: only the memory scenario runs without one")
        return self.main

    def ensure_archive(self) -> str:
        """The archive of the main dataset (made by the archiver scenario, or once here)."""
        if self.archive_bucket is None:
            bucket = self.bucket("archive")
            say("setup: archiving the dataset once (the loader and e2e read it)")
            self.archive(self.main_dataset(), bucket, "archiver-setup")
            self.archive_bucket = bucket
        return self.archive_bucket

    def ensure_replay(self) -> dict[str, Any]:
        """The main dataset's replay topic, as the loader wrote it (the Dagster job's processor input)."""
        if self.replay is None:
            say("setup: loading the day into its replay topic once (the processor scenario reads it)")
            self.replay = self.load_day("loader-setup", self.main_dataset().topic, self.ensure_archive())
        return self.replay

    # ------------------------------------------------------------------ 3. archiver

    def scenario_archiver(self) -> None:
        data, ours, ref, rss, bare = self.main_dataset(), [], [], [], []
        for run in range(self.config.runs):
            bucket = self.bucket("archive" if run == 0 else f"archive{run}")

            def reference(run: int = run) -> None:
                ref.append(self.consumer_reference("archiver", data.topic, data.records, run))

            def floor(run: int = run) -> None:
                r = self.child("consume-loop", f"consume-loop{run}", topic=data.topic, records=data.records,
                               group=f"bench.{self.id}.loop{run}")
                bare.append(r["rate"])
                say(f"archiver run {run + 1}: bare Python consume loop {r['rate']:,.0f} rec/s")

            def mine(run: int = run, bucket: str = bucket) -> None:
                r = self.archive(data, bucket, f"archiver{run}")
                ours.append(r["rate"])
                rss.append(r["peak_rss_bytes"])
                say(f"archiver run {run + 1}: archiver {r['rate']:,.0f} rec/s ({r['files']} files, "
                    f"{r['bytes_written'] / MIB:.0f} MiB Parquet), peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB")

            alternate(run, [reference, floor, mine])
            if run == 0:
                self.archive_bucket = bucket
            else:
                dataset.delete_bucket(self.settings, bucket)
        self.results["scenarios"]["archiver"] = {
            "records": data.records, "ours_rps": summary(ours), "reference_rps": summary(ref),
            "ratio": summary(ratios(ours, ref)), "target": 0.5, "reference": "ConsumerPerformance",
            "peak_rss_bytes": summary(rss),
            # what a Python consumer on confluent-kafka gets at all, and how much of it the archiver keeps
            "bare_loop_rps": summary(bare), "ratio_bare_loop": summary(ratios(bare, ref)),
            "ratio_to_bare_loop": summary(ratios(ours, bare)),
        }

    # ------------------------------------------------------------------ 1. replay load

    def scenario_load(self) -> None:
        from workers.replay.producer import PRODUCER_TUNING

        data, bucket = self.main_dataset(), self.ensure_archive()
        payload = self.tmp / "payload.txt"
        samples = dataset.write_payload_file(self.settings, data.topic, payload)
        props = kafka_tools.java_producer_props(PRODUCER_TUNING)
        say(f"load: ProducerPerformance with {samples:,} sampled values, keys over {data.users} users, {props}")
        ours, ours_mb, ours_produce, ref, ref_mb, rss = [], [], [], [], [], []
        for run in range(self.config.runs):
            pp_topic = self.topic(f"pp{run}")

            def reference(run: int = run, pp_topic: str = pp_topic) -> None:
                dataset.create_topic(self.settings, pp_topic, self.config.replay_partitions)
                r = kafka_tools.producer_performance(self.settings.bootstrap_servers, pp_topic, data.records, payload,
                                                     props, data.users, "ProducerPerformance")
                ref.append(r.records_per_s)
                ref_mb.append(r.mb_per_s)
                say(f"load run {run + 1}: ProducerPerformance {r.records_per_s:,.0f} rec/s, {r.mb_per_s:.1f} MiB/s")
                dataset.delete_topics(self.settings, [pp_topic])

            def mine(run: int = run) -> None:
                r = self.load_day(f"loader{run}", data.topic, bucket)
                if r["records"] != data.records:
                    raise RuntimeError(f"loader replayed {r['records']} of {data.records} records")
                self.replay = r
                ours.append(r["rate"])
                ours_mb.append(r["rate"] * data.mean_value_bytes / MIB)
                if r.get("produce_seconds"):
                    ours_produce.append(data.records / r["produce_seconds"])
                rss.append(r["peak_rss_bytes"])
                say(f"load run {run + 1}: loader {r['rate']:,.0f} rec/s overall "
                    f"({ours_produce[-1] if ours_produce else 0:,.0f} rec/s in its produce phase), "
                    f"peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB")

            alternate(run, [reference, mine])
        self.results["scenarios"]["load"] = {
            "records": data.records, "mean_value_bytes": data.mean_value_bytes, "producer_props": props,
            "ours_rps": summary(ours), "reference_rps": summary(ref), "ratio": summary(ratios(ours, ref)),
            "ours_mibps": summary(ours_mb), "reference_mibps": summary(ref_mb),
            "ratio_mibps": summary(ratios(ours_mb, ref_mb)),
            "ours_produce_phase_rps": summary(ours_produce),
            "ratio_produce_phase": summary(ratios(ours_produce, ref)) if len(ours_produce) == len(ref) else {},
            "target": 0.5, "reference": "ProducerPerformance", "peak_rss_bytes": summary(rss),
        }

    # ------------------------------------------------------------------ 2. processor (+ Quix peer)

    def scenario_processor(self) -> None:
        """Every available variant, ConsumerPerformance and the Quix peer(s) on the day's replay topic.

        One input for all of them: the replay topic the loader wrote (as the Dagster job reads it),
        with the grace the job passes. In each run the steps go in one order, in the next reversed.
        """
        records, bucket = self.main_dataset().records, self.bucket("processor")
        replay = self.ensure_replay()
        topic, grace_ms = replay["replay_topic"], replay.get("grace_ms")
        variants, skipped = self.processor_variants()
        quix_modes = self.quix_modes()
        say(f"processor: input {topic} (the day's replay topic), grace_ms {grace_ms}; variants "
            f"{', '.join(v.name for v in variants) or 'none'}; Quix {', '.join(quix_modes) or 'none'}")
        for name, reason in skipped.items():
            say(f"processor: {name} skipped: {reason}")
        ref: list[float] = []
        ours: dict[str, list[float]] = {v.name: [] for v in variants}
        rss: dict[str, list[int]] = {v.name: [] for v in variants}
        quix: dict[str, dict[str, Any]] = {mode: {"rates": [], "rss": []} for mode in quix_modes}
        windows: dict[str, list[list]] = {}
        bare: list[float] = []

        def reference(run: int) -> None:
            ref.append(self.consumer_reference("processor", topic, records, run))

        def floor(run: int) -> None:
            """No work per record: what any Python processor on this client can reach at most."""
            r = self.child("consume-loop", f"processor-loop{run}", topic=topic, records=records,
                           group=f"bench.{self.id}.proc-loop{run}", like="processor")
            bare.append(r["rate"])
            say(f"processor run {run + 1}: bare Python consume loop {r['rate']:,.0f} rec/s")

        def mine(run: int, variant: ProcessorVariant) -> None:
            r = self.processor_child(f"processor-{variant.name}-{run}", topic,
                                     f"bench.{self.id}.proc-{variant.name}-{run}", bucket, records,
                                     grace_ms=grace_ms, pipeline=variant.pipeline, version=variant.version,
                                     kwargs=variant.kwargs, dump_report=run == 0)
            ours[variant.name].append(r["rate"])
            rss[variant.name].append(r["peak_rss_bytes"])
            if run == 0:
                windows[variant.name] = r.get("windows", [])
            say(f"processor run {run + 1}: {variant.name} {r['rate']:,.0f} rec/s, "
                f"peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB")

        def peer(run: int, mode: str) -> None:
            r = self.quix_peer(topic, records, mode, run)
            quix[mode]["rates"].append(r["rate"])
            quix[mode]["rss"].append(r["peak_rss_bytes"])
            quix[mode]["internal_topics"] = r["internal_topics"]
            if run == 0:
                windows[f"quix-{mode}"] = r["windows"]
            say(f"processor run {run + 1}: Quix Streams ({mode}) {r['rate']:,.0f} rec/s from its first record, "
                f"peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB, internal topics {r['internal_topics'] or 'none'}")

        for run in range(self.config.runs):
            steps: list[Callable[[], None]] = [lambda run=run: reference(run), lambda run=run: floor(run)]
            steps += [lambda run=run, v=v: mine(run, v) for v in variants]
            steps += [lambda run=run, m=m: peer(run, m) for m in quix_modes]
            alternate(run, steps)
        self.results["scenarios"]["processor"] = self.processor_result(
            records, topic, grace_ms, ref, ours, rss, quix, windows, variants, skipped, bare)

    def processor_result(self, records: int, topic: str, grace_ms: int | None, ref: list[float],
                         ours: dict[str, list[float]], rss: dict[str, list[int]], quix: dict[str, dict[str, Any]],
                         windows: dict[str, list[list]], variants: list[ProcessorVariant],
                         skipped: dict[str, str], bare: list[float]) -> dict[str, Any]:
        """Ratios per variant (vs ConsumerPerformance) and per Quix mode (the Quix variant vs the peer,
        and the bare consume loop vs the peer: the ceiling of that ratio for any Python processor)."""
        baseline = next((v for v in variants if v.quix), None)
        result: dict[str, Any] = {
            "records": records, "topic": topic, "input": "replay", "grace_ms": grace_ms,
            "reference": "ConsumerPerformance", "reference_rps": summary(ref), "skipped": skipped, "variants": {},
            "quix": {}, "bare_loop_rps": summary(bare), "ratio_bare_loop": summary(ratios(bare, ref)),
        }
        for v in variants:
            result["variants"][v.name] = {
                "label": v.label, "pipeline": v.pipeline, "version": v.version, "kwargs": v.kwargs,
                "ours_rps": summary(ours[v.name]), "ratio": summary(ratios(ours[v.name], ref)),
                "target": v.target, "peak_rss_bytes": summary(rss[v.name]),
                "same_totals_as": {other: compare_windows(windows[v.name], windows[other])
                                   for other in windows if other != v.name and other.startswith("quix-")},
            }
        for mode, x in quix.items():
            entry: dict[str, Any] = {
                "mode": mode, "reference": f"Quix Streams ({mode})", "reference_rps": summary(x["rates"]),
                "peak_rss_bytes": summary(x["rss"]), "internal_topics": x.get("internal_topics", []),
                "target": QUIX_TARGETS.get(mode),
            }
            if bare:
                entry["ceiling_ratio"] = summary(ratios(bare, x["rates"]))
            if baseline is not None:
                entry.update(ours=baseline.name, ours_rps=summary(ours[baseline.name]),
                             ratio=summary(ratios(ours[baseline.name], x["rates"])),
                             totals_check=compare_windows(windows[baseline.name], windows[f"quix-{mode}"]))
            result["quix"][mode] = entry
        return result

    def processor_variants(self) -> tuple[list[ProcessorVariant], dict[str, str]]:
        """The configured variants this commit can run, and why the others are skipped."""
        chosen = [PROCESSOR_VARIANTS[name] for name in self.config.processor_variants]
        runnable, skipped = [], {}
        for variant in chosen:
            reason = variant_unavailable(variant)
            if reason:
                skipped[variant.name] = reason
            else:
                runnable.append(variant)
        return runnable, skipped

    def quix_modes(self) -> list[str]:
        if not self.config.quix_modes:
            return []
        if not machine.QUIX_PYTHON.exists():
            raise RuntimeError(f"Quix Streams is not installed at {machine.QUIX_PYTHON}: run `make bench` "
                               "(or --quix-modes '' to leave the peer out)")
        return list(self.config.quix_modes)

    def quix_peer(self, topic: str, records: int, mode: str, run: int) -> dict[str, Any]:
        """One Quix Streams run over ``topic`` with our processor's fetch tuning."""
        command = [str(machine.QUIX_PYTHON), str(Path(__file__).with_name("quix_peer.py")),
                   "--broker", self.settings.bootstrap_servers, "--topic", topic, "--mode", mode,
                   "--group", f"bench.{self.id}.quix-{mode}-{run}", "--records", str(records),
                   "--consumer-config", json.dumps(kafka_helpers.BULK_CONSUMER_TUNING)]
        r = procs.run(command, label=f"quix-{mode}", show=_show_child, timeout=3600).result_json()
        if r["records"] != records:
            raise RuntimeError(f"Quix Streams ({mode}) saw {r['records']} of {records} records")
        if mode == "best" and r["internal_topics"]:
            raise RuntimeError(f"Quix Streams (best) created internal topics {r['internal_topics']}: not the "
                               "no-changelog, no-repartition configuration it claims to be")
        return r

    # ------------------------------------------------------------------ 4. end-to-end through Dagster

    def scenario_e2e(self) -> None:
        data, bucket = self.main_dataset(), self.ensure_archive()
        home = self.tmp / "dagster_home"
        home.mkdir(exist_ok=True)
        shutil.copy(procs.ROOT / "dagster.yaml", home / "dagster.yaml")
        run_config = self.tmp / "e2e.yaml"
        run_config.write_text(json.dumps({"resources": {"replay": {"config": {"force": True}}}}))
        env = {
            "DAGSTER_HOME": str(home), "KAPPA_S3_BUCKET": bucket, "KAPPA_EVENTS_TOPIC": data.topic,
            "KAPPA_PARTITIONS_START": min(self.day, os.environ.get("KAPPA_PARTITIONS_START", self.day)),
        }
        dagster = str(Path(sys.executable).with_name("dagster"))
        runs: list[dict[str, Any]] = []
        for run in range(self.config.e2e_runs):
            command = [dagster, "job", "execute", "-m", "kappa_dagster", "-j", "reprocess", "-c", str(run_config),
                       "--tags", json.dumps({"dagster/partition": self.day})]
            say(f"e2e run {run + 1}: dagster job execute -j reprocess (day {self.day}, {data.records:,} events)")
            done = procs.run(command, label="dagster", env=env, show=lambda line: "STEP_SUCCESS" in line
                             or "RUN_SUCCESS" in line or "RUN_FAILURE" in line, timeout=3600)
            steps = dagster_steps(home)
            wall = done.wall_s
            entry = {"wall_s": wall, "steps": steps, "events_per_s": data.records / wall,
                     "peak_rss_bytes": done.peak_rss_bytes}
            runs.append(entry)
            say(f"e2e run {run + 1}: {wall:.1f}s wall, {data.records / wall:,.0f} events/s, steps "
                + ", ".join(f"{k} {v:.1f}s" for k, v in steps.items()))
        self.results["scenarios"]["e2e"] = e2e_summary(data.records, runs)

    # ------------------------------------------------------------------ 5. memory

    def scenario_memory(self) -> None:
        """Peak RSS of each worker on the live path and the bounded path, at every memory size.

        Live: the archiver and the live processor (unbounded, live grace) over the source topic from
        the beginning. Bounded: the replay loader and the bounded processor over the loader's replay
        topic (the Dagster job's path). Every size gets a dataset of its own with the same value size.
        """
        config, measured, value_bytes = self.config, {}, {}
        for size in config.memory_sizes:
            reuse = self.main is not None and size == self.main.records and config.memory_value_bytes == \
                config.value_bytes
            data = self.main if reuse else self.make_dataset(f"mem{size}", size, config.memory_value_bytes)
            assert data is not None
            measured[size], value_bytes[str(size)] = self.memory_at(data), round(data.mean_value_bytes, 1)
            if not config.keep and data is not self.main:
                dataset.delete_topics(self.settings, [data.topic])
        sizes = sorted(measured)
        table = {}
        for component, path in MEMORY_COMPONENTS.items():
            peaks = {str(size): measured[size][component]["peak_rss_bytes"] for size in sizes}
            rates = {str(size): measured[size][component]["rate"] for size in sizes}
            small, large = peaks[str(sizes[0])], peaks[str(sizes[-1])]
            table[component] = {"path": path, "peak_rss_bytes": peaks, "rate": rates,
                                "ratio": large / small if small else None}
        self.results["scenarios"]["memory"] = {
            "sizes": sizes, "value_bytes": config.memory_value_bytes, "mean_value_bytes": value_bytes,
            "components": table, "target": 1.2,
            "pipeline": f"orders v{MEMORY_VERSION}",
        }

    def memory_at(self, data: dataset.Dataset) -> dict[str, dict[str, float]]:
        """The four workers over one dataset, each in its own process: peak RSS and rate."""
        size, bucket, out = data.records, self.bucket(f"mem{data.records}"), {}

        def keep(component: str, r: dict[str, Any]) -> None:
            out[component] = {"peak_rss_bytes": r["peak_rss_bytes"], "rate": r["rate"]}
            say(f"memory {size:,}: {component} peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB ({r['rate']:,.0f} rec/s)")

        keep("archiver", self.archive(data, bucket, f"archiver-mem{size}"))
        keep("processor live", self.processor_child(
            f"processor-live-mem{size}", data.topic, f"bench.{self.id}.pl{size}", bucket, size,
            version=MEMORY_VERSION, live=True))
        loaded = self.load_day(f"loader-mem{size}", data.topic, bucket)
        keep("loader", loaded)
        keep("processor bounded", self.processor_child(
            f"processor-mem{size}", loaded["replay_topic"], f"bench.{self.id}.pm{size}", bucket, size,
            version=MEMORY_VERSION, grace_ms=loaded.get("grace_ms")))
        if not self.config.keep:
            dataset.delete_topics(self.settings, [loaded["replay_topic"]])
            dataset.delete_bucket(self.settings, bucket)
        return out

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        say("cleanup: bench topics, consumer groups and buckets")
        try:
            topics = dataset.topics_with_prefix(self.settings, f"bench.{self.id}.")
            dataset.delete_topics(self.settings, topics)
            admin = kafka_helpers.admin_client(self.settings)
            groups = [g.group_id for g in admin.list_consumer_groups(request_timeout=30).result().valid
                      if g.group_id.startswith(f"bench.{self.id}.") or f"{self.id}" in g.group_id]
            if groups:
                for future in admin.delete_consumer_groups(groups, request_timeout=30).values():
                    with contextlib.suppress(Exception):
                        future.result()
            for bucket in sorted(set(self.buckets)):
                dataset.delete_bucket(self.settings, bucket)
        except Exception as exc:
            say(f"cleanup failed (left behind: bench.{self.id}.* topics, kbench-{self.id}* buckets): {exc}")


def compare_windows(ours: list[list], quix: list[list], tolerance: float = 1e-6) -> dict[str, Any]:
    """Same (window, type) keys, same counts, sums equal within ``tolerance`` (relative)."""
    mine = {(int(w[0]), str(w[1])): (int(w[2]), float(w[3])) for w in ours}
    theirs = {(int(w[0]), str(w[1])): (int(w[2]), float(w[3])) for w in quix}
    keys_differ = len(set(mine) ^ set(theirs))
    count_differ = sum(1 for k in set(mine) & set(theirs) if mine[k][0] != theirs[k][0])
    amount_differ = sum(
        1 for k in set(mine) & set(theirs)
        if abs(mine[k][1] - theirs[k][1]) > tolerance * max(1.0, abs(mine[k][1]))
    )
    return {
        "equal": keys_differ == count_differ == amount_differ == 0 and bool(mine),
        "windows_ours": len(mine), "windows_quix": len(theirs), "keys_differ": keys_differ,
        "counts_differ": count_differ, "amounts_differ": amount_differ,
        "events_ours": sum(v[0] for v in mine.values()), "events_quix": sum(v[0] for v in theirs.values()),
        "amount_ours": round(sum(v[1] for v in mine.values()), 2),
        "amount_quix": round(sum(v[1] for v in theirs.values()), 2),
    }


def e2e_phase(step_key: str) -> str:
    """Dagster step -> load / consume / report (the report's asset checks belong to the report)."""
    if step_key.startswith("replay_load"):
        return "load"
    if step_key.startswith("replay_consume"):
        return "consume"
    return "report"


def e2e_summary(records: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    split = [{phase: sum(v for k, v in r["steps"].items() if e2e_phase(k) == phase)
              for phase in ("load", "consume", "report")} for r in runs]
    return {
        "records": records,
        "wall_s": summary([r["wall_s"] for r in runs]),
        "events_per_s": summary([r["events_per_s"] for r in runs]),
        "phases_s": {phase: summary([s[phase] for s in split]) for phase in ("load", "consume", "report")},
        "dagster_overhead_s": summary([r["wall_s"] - sum(r["steps"].values()) for r in runs]),
        "runs": runs,
    }


def dagster_steps(home: Path) -> dict[str, float]:
    """Step durations (s) of the latest run in the bench's own DAGSTER_HOME."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)  # dagster.yaml reads its storage dir from it
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        runs = instance.get_runs(limit=1)
        if not runs:
            return {}
        stats = instance.get_run_step_stats(runs[0].run_id)
        return {s.step_key: (s.end_time or 0) - (s.start_time or 0) for s in stats if s.start_time}
    finally:
        instance.dispose()
