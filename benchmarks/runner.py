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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import dataset, kafka_tools, machine, procs
from benchmarks.procs import say
from benchmarks.stats import ratios, summary
from workers import kafka as kafka_helpers
from workers.config import Settings, load_settings

ALL_SCENARIOS = ("load", "processor", "archiver", "e2e", "memory")
MIB = 1024 * 1024


@dataclass
class Config:
    runs: int = 3
    events: int = 1_000_000
    quix_events: int = 100_000
    memory_sizes: list[int] = field(default_factory=lambda: [1_000_000, 3_000_000])
    scenarios: list[str] = field(default_factory=lambda: list(ALL_SCENARIOS))
    e2e_runs: int = 2
    value_bytes: int = 200
    partitions: int = 6
    replay_partitions: int = 3
    keep: bool = False
    out: Path = Path(__file__).resolve().parent / "results"
    label: str = ""
    render: Path | None = None  # only re-render latest.md from this JSON


def _show_child(line: str) -> bool:
    """Which lines of a child's stderr are worth echoing as progress."""
    return any(marker in line for marker in ("loader produce", "loader sort: ", "quix:", "records=", "Traceback"))


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
        self.peaks: dict[int, dict[str, list[int]]] = {}  # size -> component -> peak RSS of each run

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

    def note_peak(self, size: int, component: str, rss: int) -> None:
        self.peaks.setdefault(size, {}).setdefault(component, []).append(int(rss))

    def make_dataset(self, name: str, records: int) -> dataset.Dataset:
        topic = self.topic(name)
        say(f"dataset: producing {records:,} events (~{self.config.value_bytes} B values) to {topic}")
        data = dataset.produce(
            self.settings, topic, records, day=self.day, partitions=self.config.partitions,
            value_bytes=self.config.value_bytes,
            progress=lambda n, s: say(f"  dataset: {n:,}/{records:,} ({n / s:,.0f}/s)"),
        )
        say(f"dataset: {records:,} events in {data.seconds:.1f}s, mean value {data.mean_value_bytes:.0f} B")
        return data

    def archive(self, data: dataset.Dataset, bucket: str, label: str) -> dict[str, Any]:
        result = self.child("archiver", label, topic=data.topic, group=f"bench.{self.id}.{label}", bucket=bucket)
        if result["records"] != data.records:
            raise RuntimeError(f"{label}: archived {result['records']} of {data.records} records")
        return result

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
                    except Exception as exc:  # keep the other scenarios' results
                        say(f"scenario {name} FAILED: {type(exc).__name__}: {str(exc)[:2000]}")
                        self.results["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
        finally:
            if not config.keep:
                self.cleanup()
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
        self.results["meta"]["load_average_end"] = machine.load_average()
        return self.results

    def ensure_archive(self) -> str:
        """The archive of the main dataset (made by the archiver scenario, or once here)."""
        if self.archive_bucket is None:
            assert self.main is not None
            bucket = self.bucket("archive")
            say("setup: archiving the dataset once (the loader and e2e read it)")
            self.archive(self.main, bucket, "archiver-setup")
            self.archive_bucket = bucket
        return self.archive_bucket

    def ensure_replay(self) -> dict[str, Any]:
        """The main dataset's replay topic, as the loader wrote it (the Dagster job's processor input)."""
        if self.replay is None:
            assert self.main is not None
            say("setup: loading the day into its replay topic once (the processor scenario reads it)")
            self.replay = self.child("loader", "loader-setup", topic=self.main.topic, day=self.day,
                                     bucket=self.ensure_archive(), partitions=self.config.replay_partitions)
        return self.replay

    # ------------------------------------------------------------------ 3. archiver

    def scenario_archiver(self) -> None:
        assert self.main is not None
        data, ours, ref, rss = self.main, [], [], []
        for run in range(self.config.runs):
            bucket = self.bucket("archive" if run == 0 else f"archive{run}")

            def reference(run: int = run) -> None:
                r = kafka_tools.consumer_performance(self.settings.bootstrap_servers, data.topic, data.records,
                                                     f"bench.{self.id}.cp-archiver{run}", "ConsumerPerformance")
                ref.append(r.records_per_s)
                say(f"archiver run {run + 1}: ConsumerPerformance {r.records_per_s:,.0f} rec/s")

            def mine(run: int = run, bucket: str = bucket) -> None:
                r = self.archive(data, bucket, f"archiver{run}")
                ours.append(r["rate"])
                rss.append(r["peak_rss_bytes"])
                say(f"archiver run {run + 1}: archiver {r['rate']:,.0f} rec/s ({r['files']} files, "
                    f"{r['bytes_written'] / MIB:.0f} MiB Parquet), peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB")

            for step in ((reference, mine) if run % 2 == 0 else (mine, reference)):
                step()
            if run == 0:
                self.archive_bucket = bucket
            else:
                dataset.delete_bucket(self.settings, bucket)
        for value in rss:
            self.note_peak(data.records, "archiver", value)
        self.results["scenarios"]["archiver"] = {
            "records": data.records, "ours_rps": summary(ours), "reference_rps": summary(ref),
            "ratio": summary(ratios(ours, ref)), "target": 0.5, "reference": "ConsumerPerformance",
        }

    # ------------------------------------------------------------------ 1. replay load

    def scenario_load(self) -> None:
        from workers.replay_loader import PRODUCER_TUNING

        assert self.main is not None
        data, bucket = self.main, self.ensure_archive()
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
                r = self.child("loader", f"loader{run}", topic=data.topic, day=self.day, bucket=bucket,
                               partitions=self.config.replay_partitions)
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

            for step in ((reference, mine) if run % 2 == 0 else (mine, reference)):
                step()
        for value in rss:
            self.note_peak(data.records, "loader", value)
        self.results["scenarios"]["load"] = {
            "records": data.records, "mean_value_bytes": data.mean_value_bytes, "producer_props": props,
            "ours_rps": summary(ours), "reference_rps": summary(ref), "ratio": summary(ratios(ours, ref)),
            "ours_mibps": summary(ours_mb), "reference_mibps": summary(ref_mb),
            "ratio_mibps": summary(ratios(ours_mb, ref_mb)),
            "ours_produce_phase_rps": summary(ours_produce),
            "ratio_produce_phase": summary(ratios(ours_produce, ref)) if len(ours_produce) == len(ref) else {},
            "target": 0.5, "reference": "ProducerPerformance",
        }

    # ------------------------------------------------------------------ 2. processor

    def scenario_processor(self) -> None:
        assert self.main is not None
        data, bucket = self.main, self.bucket("processor")
        # the replay topic of the day with the grace the Dagster job passes (replay_consume)
        replay = self.ensure_replay()
        topic, grace_ms = replay["replay_topic"], replay.get("grace_ms")
        say(f"processor: input {topic} (the day's replay topic), grace_ms {grace_ms}")
        ours, ref, rss = [], [], []
        for run in range(self.config.runs):
            def reference(run: int = run) -> None:
                r = kafka_tools.consumer_performance(self.settings.bootstrap_servers, topic, data.records,
                                                     f"bench.{self.id}.cp-processor{run}", "ConsumerPerformance")
                ref.append(r.records_per_s)
                say(f"processor run {run + 1}: ConsumerPerformance {r.records_per_s:,.0f} rec/s")

            def mine(run: int = run) -> None:
                r = self.child("processor", f"processor{run}", topic=topic, group=f"bench.{self.id}.proc{run}",
                               bucket=bucket, grace_ms=grace_ms)
                if r["records"] != data.records or not r["complete"]:
                    raise RuntimeError(f"processor processed {r['records']} of {data.records} records")
                ours.append(r["rate"])
                rss.append(r["peak_rss_bytes"])
                say(f"processor run {run + 1}: processor {r['rate']:,.0f} rec/s, "
                    f"peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB")

            for step in ((reference, mine) if run % 2 == 0 else (mine, reference)):
                step()
        for value in rss:
            self.note_peak(data.records, "processor", value)
        result: dict[str, Any] = {
            "records": data.records, "ours_rps": summary(ours), "reference_rps": summary(ref),
            "ratio": summary(ratios(ours, ref)), "target": 0.5, "reference": "ConsumerPerformance",
            "topic": "replay", "grace_ms": grace_ms,
        }
        self.results["scenarios"]["processor"] = result
        result["quix"] = self.processor_vs_quix(bucket)

    def processor_vs_quix(self, bucket: str) -> dict[str, Any]:
        if not machine.QUIX_PYTHON.exists():
            raise RuntimeError(f"Quix Streams is not installed at {machine.QUIX_PYTHON}: run `make bench`")
        data = self.make_dataset("quix", self.config.quix_events)
        ours, ref, checks = [], [], []
        for run in range(self.config.runs):
            outputs: dict[str, list] = {}

            def reference(run: int = run, outputs: dict = outputs) -> None:
                command = [str(machine.QUIX_PYTHON), str(Path(__file__).with_name("quix_peer.py")),
                           "--broker", self.settings.bootstrap_servers, "--topic", data.topic,
                           "--group", f"bench.{self.id}.quix{run}", "--records", str(data.records)]
                r = procs.run(command, label="quix", show=_show_child, timeout=3600).result_json()
                if r["records"] != data.records:
                    raise RuntimeError(f"Quix Streams emitted {r['records']} of {data.records} updates")
                ref.append(r["rate"])
                outputs["quix"] = r["windows"]
                say(f"quix run {run + 1}: Quix Streams {r['rate']:,.0f} rec/s, "
                    f"peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB")

            def mine(run: int = run, outputs: dict = outputs) -> None:
                r = self.child("processor", f"processor-q{run}", topic=data.topic, group=f"bench.{self.id}.pq{run}",
                               bucket=bucket, dump_report=run == 0)
                if r["records"] != data.records or not r["complete"]:
                    raise RuntimeError(f"processor processed {r['records']} of {data.records} records")
                ours.append(r["rate"])
                outputs["ours"] = r.get("windows", [])
                say(f"quix run {run + 1}: processor {r['rate']:,.0f} rec/s")

            for step in ((reference, mine) if run % 2 == 0 else (mine, reference)):
                step()
            if run == 0:
                checks.append(compare_windows(outputs["ours"], outputs["quix"]))
                say(f"quix: totals {'AGREE' if checks[-1]['equal'] else 'DIFFER'}: {checks[-1]}")
        return {
            "records": data.records, "ours_rps": summary(ours), "reference_rps": summary(ref),
            "ratio": summary(ratios(ours, ref)), "target": 5.0, "reference": "Quix Streams", "totals_check": checks[0],
        }

    # ------------------------------------------------------------------ 4. end-to-end through Dagster

    def scenario_e2e(self) -> None:
        assert self.main is not None
        data, bucket = self.main, self.ensure_archive()
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
        for size in self.config.memory_sizes:
            components = self.peaks.get(size, {})
            if all(name in components for name in ("archiver", "loader", "processor")):
                say(f"memory {size:,}: reusing the peaks measured by the scenarios above")
                continue
            data = self.main if self.main is not None and size == self.main.records else None
            data = data or self.make_dataset(f"mem{size}", size)
            bucket = self.bucket(f"mem{size}")
            say(f"memory {size:,}: archiver")
            r = self.archive(data, bucket, f"archiver-mem{size}")
            self.note_peak(size, "archiver", r["peak_rss_bytes"])
            say(f"memory {size:,}: archiver peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB ({r['rate']:,.0f} rec/s)")
            r = self.child("loader", f"loader-mem{size}", topic=data.topic, day=self.day, bucket=bucket,
                           partitions=self.config.replay_partitions)
            self.note_peak(size, "loader", r["peak_rss_bytes"])
            say(f"memory {size:,}: loader peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB ({r['rate']:,.0f} rec/s)")
            replay_topic = r["replay_topic"]
            r = self.child("processor", f"processor-mem{size}", topic=replay_topic, group=f"bench.{self.id}.pm{size}",
                           bucket=bucket, grace_ms=r.get("grace_ms"))
            if r["records"] != size or not r["complete"]:
                raise RuntimeError(f"processor processed {r['records']} of {size} records")
            dataset.delete_topics(self.settings, [replay_topic])
            self.note_peak(size, "processor", r["peak_rss_bytes"])
            say(f"memory {size:,}: processor peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB ({r['rate']:,.0f} rec/s)")
            if not self.config.keep and data is not self.main:
                dataset.delete_topics(self.settings, [data.topic])
                dataset.delete_bucket(self.settings, bucket)
        sizes = sorted(self.config.memory_sizes)
        table = {}
        for component in ("archiver", "loader", "processor"):
            peaks = {str(size): max(self.peaks.get(size, {}).get(component, [0])) for size in sizes}
            small, large = peaks[str(sizes[0])], peaks[str(sizes[-1])]
            table[component] = {"peak_rss_bytes": peaks, "ratio": large / small if small else None}
        self.results["scenarios"]["memory"] = {"sizes": sizes, "components": table, "target": 1.2}

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
