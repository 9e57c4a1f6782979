"""The archiver against the real stack: complete, byte-exact, crash-safe, rebalance-safe, S3-outage-safe.

Every check reads the archive INDEPENDENTLY of workers.archive.format: boto3 downloads and plain
``pl.read_parquet``, compared with a plain consumer read of the topic.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from reliability.invariants import ARCHIVE_SCHEMA  # the independent reader's view of the archive contract

from workers import kafka as kafka_helpers
from workers.archive.archiver import Archiver, ArchiverOptions, PartitionBuffer, parse_size, run_archiver, split_by_day
from workers.config import Settings
from workers.dev.generator import Faults, produce_events
from workers.errors import KappaError

FAULTS = Faults(duplicates=0.05, late=0.05, malformed=0.05)
FAST_GROUP = ["--session-timeout", "6", "--log-interval", "1"]


# ---------------------------------------------------------------- independent readers


def topic_records(settings: Settings, topic: str) -> dict[tuple[int, int], tuple]:
    """(partition, offset) -> (key, value, timestamp ms, headers) for offsets 0..end, by a plain consumer."""
    ends = kafka_helpers.end_offsets(settings, topic)
    consumer = Consumer(settings.kafka_config(**{"group.id": "unused", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    records: dict[tuple[int, int], tuple] = {}
    deadline = time.monotonic() + 90
    try:
        while len(records) < sum(ends.values()) and time.monotonic() < deadline:
            for m in consumer.consume(10_000, timeout=1):
                assert m.error() is None, m.error()
                records[(m.partition(), m.offset())] = (m.key(), m.value(), m.timestamp()[1], m.headers() or [])
    finally:
        consumer.close()
    assert set(records) == {(p, o) for p, end in ends.items() for o in range(end)}, "topic has offset gaps"
    return records


def archive_frame(s3, bucket: str, topic: str) -> pl.DataFrame:
    """All archive rows with the parts of their object key (dt, part, first, last), duplicates kept."""
    frames = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"raw/{topic}/"):
        for obj in page.get("Contents", []):
            name = obj["Key"]
            _raw, _topic, day, part, file = name.split("/")
            first, last = file.removesuffix(".parquet").split("-")
            frame = pl.read_parquet(io.BytesIO(s3.get_object(Bucket=bucket, Key=name)["Body"].read()))
            assert dict(frame.schema) == ARCHIVE_SCHEMA, name
            assert len(first) == len(last) == 20, name
            frames.append(frame.with_columns(
                key_day=pl.lit(day.removeprefix("dt=")), key_part=pl.lit(int(part.removeprefix("part="))),
                key_first=pl.lit(int(first)), key_last=pl.lit(int(last)), object=pl.lit(name),
            ))
    assert frames, "archive is empty"
    return pl.concat(frames)


def assert_archive_equals_topic(settings: Settings, s3, topic: str | None = None) -> dict[str, int]:
    """Every (partition, offset) of the topic exactly once after dedup, byte-exact, in the right object."""
    topic = topic or settings.events_topic
    rows = archive_frame(s3, settings.s3_bucket, topic)
    assert (rows["topic"] == topic).all()
    assert (rows["key_part"] == rows["partition"]).all()
    assert (rows["timestamp"].dt.date().cast(pl.String) == rows["key_day"]).all(), "record under the wrong dt="
    bounds = rows.group_by("object").agg(
        pl.col("offset").min().alias("lo"), pl.col("offset").max().alias("hi"),
        pl.col("key_first").first(), pl.col("key_last").first(),
    )
    assert (bounds["lo"] == bounds["key_first"]).all() and (bounds["hi"] == bounds["key_last"]).all()
    unique = rows.unique(subset=["partition", "offset"], keep="first")
    expected = topic_records(settings, topic)
    archived = {
        (r["partition"], r["offset"]): (
            r["key"], r["value"], int(r["timestamp"].timestamp() * 1000),
            [(h["key"], h["value"]) for h in r["headers"]],
        )
        for r in unique.iter_rows(named=True)
    }
    assert archived.keys() == expected.keys(), (len(archived), len(expected))
    mismatched = [k for k, v in expected.items() if archived[k] != v]
    assert not mismatched, (mismatched[:3], [(expected[k], archived[k]) for k in mismatched[:3]])
    assert (rows["timestamp_type"] == 1).all()
    return {"rows": rows.height, "records": len(expected), "duplicates": rows.height - unique.height,
            "files": rows["object"].n_unique()}


def checkpoints(s3, bucket: str, topic: str) -> dict[int, int]:
    import json

    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"_state/archiver/{topic}/"):
        for obj in page.get("Contents", []):
            # only checkpoint names: S3Proxy's filesystem backend lists a write in flight as `<key>-<uuid>`
            if not re.search(r"/part=\d+\.json$", obj["Key"]):
                continue
            body = json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            found[body["partition"]] = body["next_offset"]
    return found


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def archived_everything(settings: Settings, s3) -> Callable[[], bool]:
    ends = kafka_helpers.end_offsets(settings, settings.events_topic)
    return lambda: checkpoints(s3, settings.s3_bucket, settings.events_topic) == ends


# ---------------------------------------------------------------- archiver subprocesses


class ArchiverProcess:
    """``python -m workers.cli archiver ...`` with its log in a file (so the test can wait on lines)."""

    def __init__(self, log_dir: Path, name: str, *args: str) -> None:
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "archiver", *args],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy(),
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_assigned(self, timeout: float = 60) -> None:
        wait_for(lambda: "INFO kappa.archiver: assigned {" in self.text() or self.proc.poll() is not None,
                 timeout, f"assignment in {self.log}")

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def archivers(tmp_path: Path):
    started: list[ArchiverProcess] = []

    def start(name: str, *args: str) -> ArchiverProcess:
        started.append(ArchiverProcess(tmp_path, name, *args))
        return started[-1]

    yield start
    for archiver in started:
        if archiver.proc.poll() is None:
            archiver.kill()


# ---------------------------------------------------------------- tests


def test_archive_of_200k_events_is_complete_and_byte_exact(settings: Settings, s3, archivers, unique) -> None:
    """200k records (5 % duplicates, 5 % late, 5 % malformed): measured ~25 s end to end on 2 cores."""
    summary = produce_events(settings, 200_000, seed=42, faults=FAULTS, days=2)
    assert summary.malformed > 0 and summary.kinds["late"] > 0 and summary.kinds["duplicate"] > 0
    run = archivers("all", "--until-end", "--flush-records", "40000", "--group", unique("g"), *FAST_GROUP)
    assert run.wait() == 0, run.text()
    assert "records=200000 " in run.text()
    stats = assert_archive_equals_topic(settings, s3)
    assert stats["duplicates"] == 0  # an uninterrupted run leaves no overlap
    assert stats["files"] >= 6 * 2  # one file per (partition, day, flush)


def test_resume_point_is_the_s3_checkpoint_not_the_kafka_commit(settings: Settings, s3, unique) -> None:
    """A new group (no Kafka commits at all) resumes from the S3 checkpoints and writes nothing new."""
    produce_events(settings, 5000, seed=1, faults=FAULTS)
    first = run_archiver(settings, ArchiverOptions(group=unique("g"), until_end=True, session_timeout=6))
    assert first.records == 5000
    listing = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix="raw/")["Contents"])
    second = run_archiver(settings, ArchiverOptions(group=unique("other"), until_end=True, session_timeout=6))
    assert (second.consumed, second.files) == (0, 0)
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix="raw/")["Contents"]) == listing
    assert_archive_equals_topic(settings, s3)


def test_a_checkpoint_beyond_the_log_end_is_refused(settings: Settings, s3, archivers, unique) -> None:
    """E.g. the topic was deleted and recreated: new offsets would collide with archived ones."""
    produce_events(settings, 100, seed=1, partitions=1)
    s3.put_object(Bucket=settings.s3_bucket, Key=f"_state/archiver/{settings.events_topic}/part=0.json",
                  Body=b'{"next_offset": 5000}')
    run = archivers("refused", "--until-end", "--group", unique("g"), *FAST_GROUP)
    assert run.wait() == 2
    assert "is at offset 5000 but the partition ends at 100: was the topic recreated?" in run.text()
    assert "Traceback" not in run.text()
    assert not list_raw(s3, settings)


# the default run's archiver kill points are the reliability suite's (tests/reliability/test_process_faults.py,
# with figures); this 100k-event variant runs with the soak
@pytest.mark.soak
def test_sigkill_at_random_moments_then_restart_gives_the_exact_archive(settings: Settings, s3, archivers,
                                                                        unique) -> None:
    produce_events(settings, 100_000, seed=7, faults=FAULTS)
    rng, group = random.Random(1234), unique("g")
    # tiny files (~300 objects in all) so that each kill lands mid-run, between any two S3 writes
    # and a different flush size per run, so a re-archived range gets new file names (real overlaps)
    small_files = ["--batch-size", "500", "--group", group, *FAST_GROUP]
    kills = 0
    for attempt in range(4):
        before = len(list_raw(s3, settings))
        run = archivers(f"crash{attempt}", "--flush-records", str(rng.choice([400, 500, 700])), *small_files)
        target = rng.randrange(5, 40)
        wait_for(objects_reached(s3, settings, before + target, run), 90, f"{target} new objects")
        time.sleep(rng.uniform(0, 0.3))
        kills += run.proc.poll() is None
        run.kill()
    final = archivers("final", "--until-end", "--flush-records", "600", *small_files)
    assert final.wait() == 0, final.text()
    assert kills == 4
    stats = assert_archive_equals_topic(settings, s3)
    print(f"after {kills} SIGKILLs: {stats}")


def objects_reached(s3, settings: Settings, count: int, run: ArchiverProcess) -> Callable[[], bool]:
    return lambda: len(list_raw(s3, settings)) >= count or run.proc.poll() is not None


def test_two_archivers_one_stopped_one_killed_archive_still_complete(settings: Settings, s3, archivers,
                                                                     unique) -> None:
    kafka_helpers.ensure_topic(settings, settings.events_topic, 6)
    args = ["--group", unique("g"), "--flush-seconds", "1", "--flush-records", "3000", *FAST_GROUP]
    first, second = archivers("a", *args), archivers("b", *args)
    first.wait_assigned()
    second.wait_assigned()
    producer = threading.Thread(target=produce_events, args=(settings, 60_000),
                                kwargs={"rate": 12_000, "seed": 3, "faults": FAULTS})
    producer.start()
    time.sleep(1.5)
    assert first.stop() == 0, first.text()  # clean leave: flush, checkpoint, commit, revoke
    third = archivers("c", *args)
    wait_for(lambda: third.text().count("assigned {") >= 1, 60, "the third member's assignment")
    time.sleep(1)
    second.kill()  # its partitions move to the third member after the session timeout
    producer.join(60)
    wait_for(archived_everything(settings, s3), 90, "checkpoints at the end offsets")
    assert third.stop() == 0, third.text()
    assert "revoked" in first.text()
    # a member joining must not hold another's offset commit until --commit-timeout (then it rejoins)
    for member in (second, third):
        assert "did not answer in time" not in member.text(), member.text()
    stats = assert_archive_equals_topic(settings, s3)
    assert stats["records"] == 60_000


def test_idle_exit_and_prometheus_metrics(settings: Settings, s3, unique) -> None:
    import urllib.request

    produce_events(settings, 2000, seed=4, faults=FAULTS, partitions=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = ArchiverOptions(group=unique("g"), idle_exit=3, flush_seconds=0.5, metrics_port=port, session_timeout=6)
    archiver = Archiver(settings, options)
    worker = threading.Thread(target=archiver.run)
    worker.start()

    def metric(name: str) -> float:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return -1  # not serving yet
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    try:
        wait_for(lambda: metric("kappa_archiver_records_total") == 2000, 60, "records_total == 2000")
        assert metric("kappa_archiver_files_total") >= 2 and metric("kappa_archiver_written_bytes_total") > 0
        wait_for(lambda: metric("kappa_archiver_lag{") == 0, 30, "lag 0")
    finally:
        worker.join(60)  # --idle-exit ends the run by itself
    assert not worker.is_alive()
    assert_archive_equals_topic(settings, s3)


def test_days_epoch_null_values_and_odd_headers_land_where_they_belong(settings: Settings, s3, unique) -> None:
    kafka_helpers.ensure_topic(settings, settings.events_topic, 2)
    day = 86_400_000
    midnight = int(dt.datetime(2026, 11, 20, tzinfo=dt.UTC).timestamp() * 1000)
    records = [
        {"key": b"k", "value": b"epoch", "timestamp": 1},  # librdkafka reads timestamp 0 as "now"
        {"key": b"k", "value": None, "timestamp": midnight - 1},  # tombstone, last ms of the 19th
        {"key": None, "value": b"\xff\xfe not utf-8", "timestamp": midnight},
        {"key": b"", "value": b"", "timestamp": midnight + day - 1, "headers": [("h", None), ("h", b"\x00")]},
        {"key": b"k", "value": b"late", "timestamp": midnight - 3 * day, "headers": [("source", b"web")]},
    ]
    producer = Producer(settings.kafka_config())
    for partition in (0, 1):
        for record in records:
            producer.produce(settings.events_topic, partition=partition, **record)
    assert producer.flush(30) == 0
    summary = run_archiver(settings, ArchiverOptions(group=unique("g"), until_end=True, session_timeout=6))
    assert summary.records == 10
    days = {name.split("/")[2] for name in list_raw(s3, settings)}
    assert days == {"dt=1970-01-01", "dt=2026-11-17", "dt=2026-11-19", "dt=2026-11-20"}
    assert_archive_equals_topic(settings, s3)


def test_split_by_day_puts_epoch_zero_and_midnights_on_their_utc_day() -> None:
    """Timestamp 0 cannot be produced through librdkafka, so the day split is checked directly."""
    frame = pl.DataFrame(
        {"partition": [0, 0, 0, 0], "offset": [10, 11, 12, 13], "timestamp": [0, 86_399_999, 86_400_000, 5]},
    ).with_columns(pl.col("timestamp").cast(pl.Datetime("ms", "UTC")))
    split = split_by_day(frame)
    assert [(day, rows["offset"].to_list()) for day, rows in split] == [
        ("1970-01-01", [10, 11, 13]), ("1970-01-02", [12])]


def test_total_buffer_cap_flushes_the_biggest_buffers_first() -> None:
    options = ArchiverOptions(flush_records=10**9, flush_bytes=2**40, max_buffer_bytes=1500)
    archiver = Archiver(Settings(bootstrap_servers="127.0.0.1:1", events_topic="t"), options)
    for partition, rows in {0: 10, 1: 100, 2: 50}.items():
        archiver.parts[partition] = PartitionBuffer()
        frame = pl.DataFrame({"offset": range(rows), "value": [b"x" * 8] * rows})
        archiver.parts[partition].add(frame, now=0.0)
    assert archiver._due(now=1.0) == [1]  # 100 rows ~ 1.7 kB over the cap; the rest fits under it


class FlakyS3:
    """A TCP proxy in front of S3 that can be switched off: connections are cut and refused."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.up = True
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_up(self, up: bool) -> None:
        self.up = up
        if not up:
            for conn in self.open:
                conn.close()
            self.open.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                conn.close()


def test_s3_outage_pauses_consumption_and_loses_nothing(settings: Settings, s3, unique) -> None:
    kafka_helpers.ensure_topic(settings, settings.events_topic, 3)
    proxy = FlakyS3(settings.s3_endpoint_url or pytest.skip("needs the local S3 endpoint"))
    options = ArchiverOptions(group=unique("g"), flush_records=1000, batch_size=500, flush_seconds=1, session_timeout=6,
                              max_backoff=1, log_interval=1)
    archiver = Archiver(dataclasses.replace(settings, s3_endpoint_url=proxy.url), options)
    worker = threading.Thread(target=archiver.run)
    worker.start()
    try:
        wait_for(lambda: archiver.assigned_once, 60, "assignment")
        proxy.set_up(False)
        produce_events(settings, 30_000, seed=9, faults=FAULTS)
        wait_for(lambda: len(archiver.parts) == 3 and all(s.paused for s in archiver.parts.values()), 60,
                 "every partition paused")
        time.sleep(2)  # paused: nothing more is consumed while S3 is down
        held = archiver.summary.consumed
        time.sleep(2)
        # per partition at most one flush in flight (1,000 records), one more buffer and one batch
        assert archiver.summary.consumed == held <= 3 * (2 * 1000 + 500)
        assert archiver.summary.s3_errors >= 3 and archiver.summary.records == 0
        proxy.set_up(True)
        wait_for(archived_everything(settings, s3), 90, "catch-up after the outage")
    finally:
        archiver.stop.set()
        worker.join(60)
    assert archiver.summary.records == 30_000
    assert_archive_equals_topic(settings, s3)


def test_bad_options_are_one_clear_line(settings: Settings) -> None:
    for args, message in [
        (["--flush-bytes", "lots"], "size 'lots' is not understood"),
        (["--session-timeout", "1"], "--session-timeout must be between 6 and 300"),
        (["--flush-records", "0"], "--flush-records must be > 0"),
        (["--topic", "no-such-topic-xyz", "--until-end"], "does not exist"),
    ]:
        result = subprocess.run([sys.executable, "-m", "workers.cli", "archiver", *args],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and message in result.stderr, (args, result.stderr)
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("500kB") == 500_000 and parse_size("42") == 42
    with pytest.raises(KappaError):
        parse_size("12 parsecs")


def list_raw(s3, settings: Settings) -> list[str]:
    names = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket, Prefix="raw/"):
        names += [o["Key"] for o in page.get("Contents", [])]
    return names


# ---------------------------------------------------------------- offsets Kafka deleted before they were archived


def archived_offsets(s3, settings: Settings) -> list[int]:
    return sorted(archive_frame(s3, settings.s3_bucket, settings.events_topic)["offset"].unique().to_list())


def delete_up_to(settings: Settings, offset: int) -> None:
    """Move partition 0's log start to ``offset``, as retention would."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_config())
    futures = admin.delete_records([TopicPartition(settings.events_topic, 0, offset)], request_timeout=30)
    for future in futures.values():
        assert future.result(timeout=30).low_watermark == offset


def test_a_checkpoint_below_the_log_start_is_refused_unless_the_loss_is_accepted(settings: Settings, s3, archivers,
                                                                                 unique) -> None:
    """Down longer than retention: offsets 100..149 were deleted before they were archived."""
    produce_events(settings, 100, seed=1, partitions=1)
    group = unique("g")
    assert run_archiver(settings, ArchiverOptions(group=group, until_end=True, session_timeout=6)).records == 100
    produce_events(settings, 100, seed=2, partitions=1)
    delete_up_to(settings, 150)
    objects = list_raw(s3, settings)

    refused = archivers("refused", "--until-end", "--group", group, *FAST_GROUP)
    assert refused.wait() == 2
    line = "Kafka deleted offsets 100..149 (50 records) before they were archived"
    assert line in refused.text() and "--accept-data-loss" in refused.text() and "Traceback" not in refused.text()
    assert list_raw(s3, settings) == objects

    # a long-running archiver does not exit: it keeps the partition paused and says so in a metric
    archiver = Archiver(settings, ArchiverOptions(group=group, session_timeout=6, log_interval=1))
    worker = threading.Thread(target=archiver.run)
    worker.start()
    try:
        wait_for(lambda: archiver.metrics.refused._value.get() == 1, 60, "the refused-partitions gauge")
        time.sleep(2)
        assert archiver.summary.consumed == 0 and list_raw(s3, settings) == objects
    finally:
        archiver.stop.set()
        worker.join(60)

    accepted = run_archiver(settings, ArchiverOptions(group=group, until_end=True, session_timeout=6,
                                                      accept_data_loss=True))
    assert (accepted.records, accepted.skipped_offsets) == (50, 50)
    assert archived_offsets(s3, settings) == [*range(100), *range(150, 200)]


def test_a_recreated_topic_is_refused_even_when_it_grew_past_the_checkpoint(settings: Settings, s3, archivers,
                                                                            unique) -> None:
    """Offsets restart at 0 in a recreated topic: archiving from the old checkpoint would skip 0..99."""
    produce_events(settings, 100, seed=1, partitions=1)
    group = unique("g")
    run_archiver(settings, ArchiverOptions(group=group, until_end=True, session_timeout=6))
    kafka_helpers.delete_topics(settings, [settings.events_topic])
    produce_events(settings, 300, seed=2, partitions=1)
    objects = list_raw(s3, settings)
    run = archivers("recreated", "--until-end", "--group", group, "--accept-data-loss", *FAST_GROUP)
    assert run.wait() == 2
    assert "the topic was recreated" in run.text() and "Traceback" not in run.text()
    assert list_raw(s3, settings) == objects


# ---------------------------------------------------------------- timestamps without a calendar day


def test_timestamps_without_a_day_are_quarantined_byte_exact(settings: Settings, s3, unique) -> None:
    """Older brokers (or a topic with message.timestamp.after.max.ms raised) accept any timestamp."""
    kafka_helpers.ensure_topic(settings, settings.events_topic, 1, {"message.timestamp.after.max.ms": str(2**63 - 1)})
    year_10000 = 253_402_300_800_000
    stamps = [1_790_000_000_000, year_10000, -5, 2**62, 2**63 - 1, -62_135_596_800_001, -3_153_600_000_000]
    producer = Producer(settings.kafka_config())
    for index, stamp in enumerate(stamps):
        producer.produce(settings.events_topic, key=f"k{index}".encode(), value=b"\xff" + bytes([index]),
                         timestamp=stamp, headers=[("i", str(index).encode())])
    assert producer.flush(30) == 0
    summary = run_archiver(settings, ArchiverOptions(group=unique("g"), until_end=True, session_timeout=6))
    assert summary.records == len(stamps)
    names = list_raw(s3, settings)
    assert {name.split("/")[2] for name in names} == {"dt=2026-09-21", "dt=1969-12-31", "dt=1870-01-25"}
    quarantine = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix="quarantine/")["Contents"]]
    assert quarantine == [f"quarantine/{settings.events_topic}/part=0/{1:020d}-{5:020d}.parquet"]
    rows = pl.read_parquet(io.BytesIO(s3.get_object(Bucket=settings.s3_bucket, Key=quarantine[0])["Body"].read()))
    assert dict(rows.schema) == ARCHIVE_SCHEMA
    assert rows.select("offset", pl.col("timestamp").dt.epoch("ms"), "key", "value").rows() == [
        (i, stamps[i], f"k{i}".encode(), b"\xff" + bytes([i])) for i in (1, 3, 4, 5)]
    assert [h[0]["value"] for h in rows["headers"].to_list()] == [str(i).encode() for i in (1, 3, 4, 5)]


@pytest.mark.parametrize("accept", [False, True], ids=["refused", "accepted"])
def test_retention_overtaking_a_running_archiver_is_refused_or_skipped_loudly(settings: Settings, s3, archivers,
                                                                              unique, accept: bool) -> None:
    """The archiver is frozen (SIGSTOP) while records arrive and Kafka deletes them: when it thaws,
    its fetch position is gone. librdkafka must not jump to the log start silently."""
    produce_events(settings, 50, seed=1, partitions=1)
    args = ["--group", unique("g"), "--flush-seconds", "0.5", *FAST_GROUP, "--session-timeout", "30"]
    run = archivers("frozen", *args, *(["--accept-data-loss"] if accept else []))
    wait_for(lambda: "records=50 " in run.text(), 60, "the first 50 records archived")
    run.proc.send_signal(signal.SIGSTOP)
    try:
        produce_events(settings, 100, seed=2, partitions=1)
        delete_up_to(settings, 120)
    finally:
        run.proc.send_signal(signal.SIGCONT)
    if accept:
        wait_for(lambda: "SKIPPED" in run.text(), 60, "the skip to be logged")
        assert "offsets 50..119 (70 records deleted by Kafka before they were archived" in run.text()
        wait_for(lambda: "records=80 " in run.text(), 60, "offsets 120..149 archived")
        assert archived_offsets(s3, settings) == [*range(50), *range(120, 150)]
    else:
        wait_for(lambda: "refusing to archive" in run.text(), 60, "the refusal")
        assert "Kafka deleted offsets 50..119 (70 records)" in run.text()
        time.sleep(2)
        assert archived_offsets(s3, settings) == list(range(50))
    assert run.stop() == 0, run.text()


def test_a_large_file_goes_up_in_parts_and_stays_byte_exact(settings: Settings, s3, unique) -> None:
    kafka_helpers.ensure_topic(settings, settings.events_topic, 1)
    rng = random.Random(5)
    producer = Producer(settings.kafka_config())
    for _ in range(7_000):  # ~7.7 MB of incompressible values: one file of one day, above the 5 MiB threshold
        producer.produce(settings.events_topic, partition=0, key=b"k", value=rng.randbytes(1_100),
                         timestamp=1_790_000_000_000)
    assert producer.flush(30) == 0
    summary = run_archiver(settings, ArchiverOptions(group=unique("g"), until_end=True, session_timeout=6,
                                                     flush_records=10_000, multipart_bytes=5 * 2**20))
    assert summary.records == 7_000 and summary.files == 1
    (name,) = list_raw(s3, settings)
    head = s3.head_object(Bucket=settings.s3_bucket, Key=name)
    assert head["ContentLength"] >= 5 * 2**20
    assert "-" in head["ETag"], f"not a multipart object: ETag {head['ETag']}"  # multipart ETags end in -<parts>
    assert_archive_equals_topic(settings, s3)


def test_a_failed_flush_puts_its_records_back_with_their_age() -> None:
    """A buffer handed to a flush that fails is due again by its age (after the backoff), as if it
    had never left: its records still wait since they arrived, not since the failure."""
    options = ArchiverOptions(flush_seconds=60, flush_records=1_000)
    frame = pl.DataFrame({"offset": [0, 1, 2]})
    buffer = PartitionBuffer()
    buffer.add(frame, now=100.0)
    frames, records, size = buffer.detach()
    assert not buffer.due(options, 170.0, None) and buffer.in_flight == 3
    buffer.add(pl.DataFrame({"offset": [3]}), now=150.0)
    buffer.restore(frames, records, size)
    assert buffer.records == 4 and buffer.in_flight == 0 and buffer.oldest == 100.0
    assert buffer.due(options, 161.0, None)  # 61 s since offset 0 arrived
    assert [f["offset"].to_list() for f in buffer.frames] == [[0, 1, 2], [3]]


def test_a_consumer_that_never_joins_its_group_is_noticed(settings: Settings, unique) -> None:
    """The join watchdog: a real consumer that cannot reach its coordinator has no member id, and past
    ``JOIN_LIMIT_S`` the archiver calls it stuck; one that joined (even with no partitions) is not."""
    from workers.archive.archiver import JOIN_LIMIT_S

    archiver = Archiver(settings, ArchiverOptions(group=unique("watchdog")))
    nowhere = dataclasses.replace(settings, bootstrap_servers="127.0.0.1:1")
    archiver.consumer = Consumer(nowhere.kafka_config(**{"group.id": unique("watchdog"), "log_level": 0}))
    archiver.consumer.subscribe([settings.events_topic])
    try:
        archiver.subscribed_at = time.monotonic()
        archiver.consumer.consume(timeout=1.0)
        assert not archiver._not_joined(), "called stuck before JOIN_LIMIT_S"
        archiver.subscribed_at = time.monotonic() - JOIN_LIMIT_S - 1
        assert archiver._not_joined()
    finally:
        archiver.consumer.close()
    kafka_helpers.ensure_topic(settings, settings.events_topic, 1)
    joined = Consumer(settings.kafka_config(**{"group.id": unique("watchdog")}))
    joined.subscribe([settings.events_topic])
    try:
        deadline = time.monotonic() + 60
        while not joined.memberid() and time.monotonic() < deadline:
            joined.consume(timeout=0.5)
        archiver.consumer, archiver.subscribed_at = joined, time.monotonic() - JOIN_LIMIT_S - 1
        assert not archiver._not_joined()
    finally:
        joined.close()
