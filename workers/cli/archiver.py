"""`kappa archiver`: archive the events topic to S3, exactly once after dedup."""

from __future__ import annotations

import logging
import signal
import threading

import typer

from workers import kafka as kafka_helpers
from workers import retry
from workers.archive.archiver import ArchiverOptions, parse_size, run_archiver
from workers.cli.common import group_name, kafka_settings, topic_name


def archiver(
    group: str = typer.Option(
        None, callback=group_name, help="Consumer group; run several archivers with one group to scale "
                   "(default: <KAPPA_GROUP_PREFIX>.archiver, i.e. kappa.archiver)."
    ),
    topic: str = typer.Option(None, callback=topic_name, help="Topic to archive (default: KAPPA_EVENTS_TOPIC)."),
    flush_bytes: str = typer.Option("32MiB", help="Flush a partition when its buffer reaches this size."),
    flush_records: int = typer.Option(1_000_000, help="Flush a partition when it buffers this many records."),
    flush_seconds: float = typer.Option(60.0, help="Flush a partition when its oldest buffered record is this old."),
    max_buffer_bytes: str = typer.Option("128MiB", help="Flush the biggest buffers when all together (buffered "
                                         "plus in flight to S3) exceed this; consuming waits beyond it."),
    flush_threads: int = typer.Option(4, help="Flushes encoding and uploading at once, off the consume thread "
                                              "(one per partition at a time)."),
    multipart_bytes: str = typer.Option("64MiB", help="Upload archive files this large or larger in parts."),
    batch_size: int = typer.Option(10_000, help="Records per consume() call."),
    until_end: bool = typer.Option(False, "--until-end", help="Stop once the assigned partitions reach the "
                                                            "end offsets read at start (after a final flush)."),
    idle_exit: float = typer.Option(None, help="Stop after this many seconds without new records."),
    session_timeout: float = typer.Option(45.0, help="Kafka group session timeout in seconds (6-300)."),
    log_interval: float = typer.Option(10.0, help="Seconds between counter log lines."),
    metrics_port: int = typer.Option(None, help="Serve Prometheus metrics on this port."),
    max_backoff: float = typer.Option(retry.MAX_BACKOFF_S, help="Longest wait between S3 retries, in seconds."),
    shutdown_timeout: float = typer.Option(60.0, help="Seconds to keep retrying S3 when stopping."),
    commit_timeout: float = typer.Option(kafka_helpers.COMMIT_LIMIT_S, help="Seconds an offset commit may take; "
                                         "a commit still waiting then means a stuck coordinator connection: "
                                         "the archiver rejoins with a new consumer."),
    instance_id: str = typer.Option(None, help="Static group member id (env KAPPA_INSTANCE_ID; 'auto' = "
                                                "kappa-archiver-<host>-<ordinal>; default 'none': dynamic member)."),
    group_protocol: str = typer.Option(None, help="Consumer group protocol: classic (default) or consumer "
                                                  "(KIP-848; env KAPPA_GROUP_PROTOCOL)."),
    accept_data_loss: bool = typer.Option(False, "--accept-data-loss", help="Skip offsets Kafka deleted before "
                                          "they were archived (logged and counted) instead of refusing."),
) -> None:
    """Consume the events topic in micro-batches and write byte-exact Parquet files plus S3 checkpoints."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    options = ArchiverOptions(
        group=group, topic=topic, flush_bytes=parse_size(flush_bytes), flush_records=flush_records,
        flush_seconds=flush_seconds, max_buffer_bytes=parse_size(max_buffer_bytes), batch_size=batch_size,
        flush_threads=flush_threads, multipart_bytes=parse_size(multipart_bytes),
        until_end=until_end, idle_exit=idle_exit,
        session_timeout=session_timeout, log_interval=log_interval, metrics_port=metrics_port,
        max_backoff=max_backoff, shutdown_timeout=shutdown_timeout, commit_timeout=commit_timeout,
        instance_id=instance_id, group_protocol=group_protocol, accept_data_loss=accept_data_loss,
    ).validate()
    settings = kafka_settings()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run_archiver(settings, options, stop)
