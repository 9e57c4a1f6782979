"""Kafka's own perf tools, run from the kafka-tools jar the stack already caches.

* ``org.apache.kafka.tools.ProducerPerformance``: the reference for the replay loader. It sends the
  same JSON values (``--payload-file``, one value per line, picked at random), with keys from the
  same number of distinct users, and the loader's acks / idempotence / compression / linger / batch.
* ``org.apache.kafka.tools.ConsumerPerformance``: the reference for the archiver and the processor,
  consuming the same topic from the beginning with a fresh group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procs
from workers.config import cache_dir

PRODUCER_CLASS = "org.apache.kafka.tools.ProducerPerformance"
CONSUMER_CLASS = "org.apache.kafka.tools.ConsumerPerformance"
JVM_OPTS = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC"]
#: librdkafka producer settings that mean the same in the Java client (same names).
SHARED_PRODUCER_KEYS = ("acks", "enable.idempotence", "linger.ms", "batch.size", "compression.type")
FINAL_PRODUCER_LINE = re.compile(
    r"(?P<records>\d+) records sent, (?P<rate>[\d.]+) records/sec \((?P<mb>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, (?P<p50>\d+) ms 50th"
)


def jar_dir() -> Path:
    return cache_dir() / "jars" / "kafka"


def kafka_version() -> str:
    jars = sorted(jar_dir().glob("kafka-tools-*.jar"))
    return jars[0].stem.removeprefix("kafka-tools-") if jars else "missing"


def java_command(main_class: str) -> list[str]:
    if not list(jar_dir().glob("kafka-tools-*.jar")):
        raise RuntimeError(f"no kafka-tools jar in {jar_dir()}: run `kappa stack up` once to fetch the jars")
    return ["java", *JVM_OPTS, "-cp", f"{jar_dir()}/*", main_class]


def java_producer_props(librdkafka: dict[str, object]) -> dict[str, str]:
    """The loader's librdkafka producer settings that have a Java twin, plus the buffer size."""
    props = {key: str(librdkafka[key]).lower() for key in SHARED_PRODUCER_KEYS if key in librdkafka}
    kbytes = librdkafka.get("queue.buffering.max.kbytes")
    if kbytes:
        props["buffer.memory"] = str(int(kbytes) * 1024)  # type: ignore[call-overload]
    return props


@dataclass
class ProducerResult:
    records: int
    records_per_s: float
    mb_per_s: float
    avg_latency_ms: float
    wall_s: float
    peak_rss_bytes: int


def producer_performance(
    bootstrap: str, topic: str, records: int, payload_file: Path, props: dict[str, str], key_range: int, label: str
) -> ProducerResult:
    command = [
        *java_command(PRODUCER_CLASS),
        "--bootstrap-server", bootstrap, "--topic", topic, "--num-records", str(records), "--throughput", "-1",
        "--payload-file", str(payload_file), "--key-distribution", "random", "--record-key-range", str(key_range),
        "--reporting-interval", "5000", "--command-property", *[f"{k}={v}" for k, v in sorted(props.items())],
    ]
    done = procs.run(command, label=label, show=lambda line: "records sent" in line)
    match = None
    for line in done.stdout.splitlines():
        match = FINAL_PRODUCER_LINE.search(line) or match
    if match is None:
        raise RuntimeError(f"{label}: no summary line in ProducerPerformance output:\n{done.stdout[-2000:]}")
    return ProducerResult(
        records=int(match["records"]),
        records_per_s=float(match["rate"]),
        mb_per_s=float(match["mb"]),
        avg_latency_ms=float(match["avg"]),
        wall_s=done.wall_s,
        peak_rss_bytes=done.peak_rss_bytes,
    )


@dataclass
class ConsumerResult:
    records: int
    mb: float
    records_per_s: float
    mb_per_s: float
    fetch_records_per_s: float
    rebalance_ms: float
    wall_s: float
    peak_rss_bytes: int


def consumer_performance(bootstrap: str, topic: str, records: int, group: str, label: str) -> ConsumerResult:
    """Consume ``records`` records of ``topic`` from the beginning with a new group."""
    command = [
        *java_command(CONSUMER_CLASS),
        "--bootstrap-server", bootstrap, "--topic", topic, "--num-records", str(records), "--group", group,
        "--timeout", "30000", "--command-property", "auto.offset.reset=earliest",
    ]
    done = procs.run(command, label=label)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    header_at = next((i for i, line in enumerate(lines) if line.startswith("start.time")), None)
    if header_at is None or header_at + 1 >= len(lines):
        raise RuntimeError(f"{label}: unexpected ConsumerPerformance output:\n{done.stdout[-2000:]}")
    names = [name.strip() for name in lines[header_at].split(",")]
    values = dict(zip(names, (value.strip() for value in lines[header_at + 1].split(",")), strict=False))
    consumed = int(float(values["data.consumed.in.nMsg"]))
    if consumed < records:
        raise RuntimeError(f"{label}: ConsumerPerformance consumed {consumed} of {records} records (timeout?)")
    return ConsumerResult(
        records=consumed,
        mb=float(values["data.consumed.in.MB"]),
        records_per_s=float(values["nMsg.sec"]),
        mb_per_s=float(values["MB.sec"]),
        fetch_records_per_s=float(values["fetch.nMsg.sec"]),
        rebalance_ms=float(values["rebalance.time.ms"]),
        wall_s=done.wall_s,
        peak_rss_bytes=done.peak_rss_bytes,
    )
