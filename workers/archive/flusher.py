"""Archive flushes off the consume thread: at most one in flight per partition, bounded by bytes.

Encoding Parquet and uploading it takes longer than consuming the same records, so the archiver
hands a partition's buffer to a small thread pool and keeps consuming. Polars' encoder and boto3's
socket I/O release the GIL, so the threads overlap for real. Per partition the flushes stay in
order (one at a time), because each checkpoint is a compare-and-swap on the one before it; the
consume thread applies every outcome (counters, commit, backoff, fence), so the flush threads share
nothing mutable with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

import polars as pl

B = TypeVar("B")


@dataclass(frozen=True)
class Flushed:
    """What one flush made durable: the checkpoint's next offset and ETag, files and bytes written."""

    next_offset: int
    files: int
    size: int
    etag: str


@dataclass
class FlushJob(Generic[B]):
    """One partition's detached buffer on its way to S3."""

    partition: int
    owner: B  # the partition's buffer object when handed out: a result for a replaced buffer is dropped
    frames: list[pl.DataFrame]
    records: int
    bytes: int
    future: Future[Flushed]


class BackgroundFlushes(Generic[B]):
    """The in-flight flushes of one archiver, keyed by partition."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kappa-archive-flush")
        self.jobs: dict[int, FlushJob[B]] = {}

    def busy(self, partition: int) -> bool:
        return partition in self.jobs

    @property
    def bytes(self) -> int:
        return sum(job.bytes for job in self.jobs.values())

    def submit(self, partition: int, owner: B, frames: list[pl.DataFrame], records: int, size: int,
               write: Callable[[], Flushed]) -> None:
        assert partition not in self.jobs, f"partition {partition} already has a flush in flight"
        self.jobs[partition] = FlushJob(partition, owner, frames, records, size, self.pool.submit(write))

    def done(self, timeout: float | None = 0.0, partitions: Iterable[int] | None = None) -> list[FlushJob[B]]:
        """Take the finished flushes (of ``partitions``, default all), waiting up to ``timeout`` for
        the first one (``None``: for all of them)."""
        chosen = [self.jobs[p] for p in (self.jobs if partitions is None else partitions) if p in self.jobs]
        if not chosen:
            return []
        futures = [job.future for job in chosen]
        if timeout is None:
            wait(futures)
        elif timeout > 0:
            wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
        finished = [job for job in chosen if job.future.done()]
        for job in finished:
            del self.jobs[job.partition]
        return finished

    def close(self) -> None:
        """Wait for what is in flight (its outcome no longer matters) and stop the threads."""
        self.pool.shutdown(wait=True)
        self.jobs.clear()
