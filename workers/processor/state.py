"""Per-partition processor state and its S3 checkpoint, the processor's commit point.

Readers follow one state JSON per partition, written by a fenced PUT after the objects it names, so
they never see half a checkpoint and a zombie can never replace the new owner's (layout:
docs/ARCHITECTURE.md, "Processor state").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import polars as pl
from botocore.client import BaseClient

from workers import keys
from workers.errors import KappaError
from workers.pipelines.base import STAT_NAMES, WINDOW_MS, Pipeline
from workers.s3 import Fenced, get_bytes, get_stored, iter_keys, put_if

STATE_FORMAT = 1
STATE_KEY_RE = re.compile(r"_state/part=(\d+)\.json$")
#: a state JSON names objects another commit may delete while we read them: re-read that often
LOAD_ATTEMPTS = 5


def to_parquet(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd")
    return buffer.getvalue()


def read_parquet(client: BaseClient, bucket: str, key: str) -> pl.DataFrame:
    data = get_bytes(client, bucket, key)
    if data is None:
        raise Fenced(key, None, f"s3://{bucket}/{key} vanished (superseded by another processor)")
    return pl.read_parquet(io.BytesIO(data))


def day_of(epoch_ms: pl.Expr) -> pl.Expr:
    """UTC day (``YYYY-MM-DD``) of an epoch-ms expression: the report/archive day of a record."""
    return epoch_ms.cast(pl.Datetime("ms", "UTC")).dt.date().cast(pl.String)


@dataclass
class PartitionState:
    """Everything one partition needs to resume exactly: in memory, checkpointed as a whole."""

    pipeline: Pipeline
    topic: str
    group: str
    partition: int
    grace_ms: int | None
    next_offset: int | None = None
    max_ts: int | None = None
    open: pl.DataFrame = field(default_factory=pl.DataFrame)
    seen: pl.DataFrame = field(default_factory=pl.DataFrame)
    stats: dict[str, Counter[str]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    snapshot: dict[str, str | None] = field(default_factory=lambda: {"open": None, "seen": None})
    seq: int = 0
    writer: str | None = None
    #: ETag of the committed JSON this state is based on (None: no JSON yet); the commit's condition
    etag: str | None = None
    finalized: bool = False
    end_offset: int | None = None
    #: closed partials not yet written, and the newest written day's partials (to append to)
    pending: pl.DataFrame = field(default_factory=pl.DataFrame)
    latest_day: tuple[str, pl.DataFrame] | None = None
    dirty: bool = False

    def __post_init__(self) -> None:
        if self.open.width == 0:
            self.open = self.pipeline.empty_partials()
        if self.pending.width == 0:
            self.pending = self.pipeline.empty_partials()
        if self.seen.width == 0:
            self.seen = pl.DataFrame(schema={WINDOW_MS: pl.Int64, **{c: pl.String for c in self.pipeline.dedup_by}})

    # ---------------------------------------------------------------- window bookkeeping

    def watermark(self) -> int | None:
        """Max timestamp seen minus grace; None while nothing can close (no data or infinite grace)."""
        if self.max_ts is None or self.grace_ms is None:
            return None
        return self.max_ts - self.grace_ms

    def close_windows(self, watermark: int | None) -> int:
        """Move windows ending at or before ``watermark`` to ``pending``; forget their dedup keys."""
        if watermark is None:
            return 0
        width = self.pipeline.window_ms
        ends = pl.col("window_start").dt.epoch("ms") + width
        closed = self.open.filter(ends <= watermark)
        if closed.height:
            self.open = self.open.filter(ends > watermark)
            self.pending = pl.concat([self.pending, closed])
            self.dirty = True
        if self.seen.height:
            self.seen = self.seen.filter(pl.col(WINDOW_MS) + width > watermark)
        return closed.height

    def add_stats(self, counts: pl.DataFrame) -> None:
        """``counts`` has columns day, outcome, n."""
        for day, outcome, n in counts.iter_rows():
            self.stats.setdefault(day, Counter())[outcome] += n
            self.stats[day]["records"] += n

    # ---------------------------------------------------------------- JSON form

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "pipeline": self.pipeline.name,
            "version": self.pipeline.version,
            "topic": self.topic,
            "group": self.group,
            "partition": self.partition,
            "seq": self.seq,
            "writer": self.writer,
            "next_offset": self.next_offset,
            "max_timestamp_ms": self.max_ts,
            "grace_ms": self.grace_ms,
            "finalized": self.finalized,
            "end_offset": self.end_offset,
            "outputs": dict(sorted(self.outputs.items())),
            "snapshot": self.snapshot,
            "stats": {day: stats_dict(c) for day, c in sorted(self.stats.items())},
            "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        }


def stats_dict(counter: Counter[str] | dict[str, int]) -> dict[str, int]:
    return {name: int(counter.get(name, 0)) for name in STAT_NAMES}


class StateStore:
    """Reads and writes the checkpoint objects of one processor prefix."""

    def __init__(self, client: BaseClient, bucket: str, prefix: str, writer: str) -> None:
        self.client, self.bucket, self.prefix, self.writer = client, bucket, prefix, writer

    def read_json(self, partition: int) -> dict[str, Any] | None:
        data = get_bytes(self.client, self.bucket, keys.processor_state(self.prefix, partition))
        return None if data is None else json.loads(data)

    def load(self, state: PartitionState) -> PartitionState:
        """Fill ``state`` from S3 (if a checkpoint exists); refuses a checkpoint of another topic/group.

        Re-reads when an object the JSON names vanished meanwhile (another member committed).
        """
        attempt = 1
        while True:
            try:
                return self._load(replace(state))
            except Fenced:
                if attempt >= LOAD_ATTEMPTS:
                    raise
                attempt += 1

    def _load(self, state: PartitionState) -> PartitionState:
        stored = get_stored(self.client, self.bucket, keys.processor_state(self.prefix, state.partition))
        if stored is None:
            return state
        doc, state.etag = json.loads(stored.body), stored.etag
        for name, expected in (("topic", state.topic), ("group", state.group)):
            if doc.get(name) != expected:
                raise KappaError(
                    f"s3://{self.bucket}/{self.prefix} holds the state of {name} {doc.get(name)!r}, not {expected!r}; "
                    "use another --group (bounded) or the topic this live pipeline was started on"
                )
        state.seq, state.writer = doc["seq"], doc["writer"]
        state.next_offset, state.max_ts = doc["next_offset"], doc["max_timestamp_ms"]
        state.finalized, state.end_offset = doc["finalized"], doc.get("end_offset")
        state.outputs = dict(doc["outputs"])
        state.snapshot = dict(doc["snapshot"])
        state.stats = {day: Counter(values) for day, values in doc["stats"].items()}
        if state.snapshot.get("open"):
            state.open = read_parquet(self.client, self.bucket, state.snapshot["open"]).cast(
                state.pipeline.partial_schema  # type: ignore[arg-type]
            )
        if state.snapshot.get("seen"):
            state.seen = read_parquet(self.client, self.bucket, state.snapshot["seen"]).cast(state.seen.schema)  # type: ignore[arg-type]
        if state.outputs:
            day = max(state.outputs)
            state.latest_day = (day, self.read_partials(state, state.outputs[day]))
        return state

    def read_partials(self, state: PartitionState, key: str) -> pl.DataFrame:
        return read_parquet(self.client, self.bucket, key).cast(state.pipeline.partial_schema)  # type: ignore[arg-type]

    def put(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)

    def commit(self, state: PartitionState) -> list[str]:
        """Write outputs + snapshot, then the state JSON (the commit point). Returns superseded keys.

        ``state`` changes only after the JSON PUT succeeded, so a failed commit can simply be retried.
        Raises :class:`Fenced` (naming the winner) when another processor committed since ``state``
        was loaded; the objects written for this attempt are then deleted again.
        """
        seq = state.seq + 1
        written: list[str] = []
        try:
            outputs, latest_day, replaced_outputs = self._write_outputs(state, seq, written)
            snapshot = self._write_snapshot(state, seq, written)
            staged = replace(state, seq=seq, writer=self.writer, outputs=outputs, snapshot=snapshot)
            body = json.dumps(staged.to_json(), indent=1).encode()
            etag = put_if(self.client, self.bucket, keys.processor_state(self.prefix, state.partition), body,
                          state.etag)
        except Fenced as exc:
            self._discard_lost(state.partition, written)
            raise self._fence_error(state, seq, exc) from None
        superseded = replaced_outputs + [k for k in state.snapshot.values() if k]
        state.seq, state.writer, state.outputs, state.snapshot, state.etag = seq, self.writer, outputs, snapshot, etag
        state.latest_day, state.pending, state.dirty = latest_day, state.pipeline.empty_partials(), False
        return superseded

    def _discard_lost(self, partition: int, written: list[str]) -> None:
        """Delete what a lost commit wrote, except anything the committed JSON names (a PUT of ours
        may have landed before it was superseded; then its successor may still name our objects)."""
        try:
            current = self.read_json(partition) or {}
        except Exception:  # cleanup is best effort: without the current JSON, delete nothing
            return
        named = set(current.get("outputs", {}).values()) | set((current.get("snapshot") or {}).values())
        self.delete([key for key in written if key not in named])

    def _fence_error(self, state: PartitionState, seq: int, exc: Fenced) -> Fenced:
        """The same fence, with one line naming both writers."""
        winner = "the checkpoint was deleted"
        if exc.current is not None:
            doc = json.loads(exc.current)
            winner = f"seq {doc.get('seq')} of writer {doc.get('writer')}"
        elif exc.key != keys.processor_state(self.prefix, state.partition):
            winner = f"{exc.key} (named by our state) vanished"
        detail = (f"partition {state.partition}: commit of seq {seq} by writer {self.writer} (based on seq "
                  f"{state.seq} of writer {state.writer}) lost to {winner}")
        return Fenced(exc.key, exc.current, detail)

    def _write_outputs(
        self, state: PartitionState, seq: int, written: list[str]
    ) -> tuple[dict[str, str], tuple[str, pl.DataFrame] | None, list[str]]:
        """One object per touched day: that day's earlier partials + newly closed windows."""
        outputs, latest_day, superseded = dict(state.outputs), state.latest_day, []
        if state.pending.height == 0:
            return outputs, latest_day, superseded
        pending = state.pending.with_columns(day_of(pl.col("window_start").dt.epoch("ms")).alias("_day"))
        for (day,), new in sorted(pending.partition_by("_day", as_dict=True).items()):
            new = new.drop("_day")
            previous = outputs.get(day)
            if previous is not None:
                cached = latest_day[1] if latest_day and latest_day[0] == day else None
                before = self.read_partials(state, previous) if cached is None else cached
                new = state.pipeline.merge(pl.concat([before, new]))
                superseded.append(previous)
            new = new.sort(state.pipeline.key_columns)
            key = keys.processor_output(self.prefix, day, state.partition, seq, self.writer)
            written.append(key)
            self.put(key, to_parquet(new))
            outputs[day] = key
            if latest_day is None or day >= latest_day[0]:
                latest_day = (day, new)
        return outputs, latest_day, superseded

    def _write_snapshot(self, state: PartitionState, seq: int, written: list[str]) -> dict[str, str | None]:
        snapshot: dict[str, str | None] = {}
        for kind, frame in (("open", state.open), ("seen", state.seen)):
            key = None
            if frame.height:
                key = keys.processor_snapshot(self.prefix, state.partition, seq, self.writer, kind)
                written.append(key)
                self.put(key, to_parquet(frame))
            snapshot[kind] = key
        return snapshot

    def delete(self, keys_: list[str]) -> None:
        """Best effort: garbage only costs storage, readers never follow it."""
        for start in range(0, len(keys_), 1000):
            chunk = keys_[start : start + 1000]
            with contextlib.suppress(Exception):  # deletion is an optimisation
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )


# -------------------------------------------------------------------- readers (live report, bounded report)


def list_states(client: BaseClient, bucket: str, prefix: str) -> dict[int, dict[str, Any]]:
    """Every partition's committed state JSON under ``prefix``."""
    states = {}
    for obj in iter_keys(client, bucket, f"{prefix}_state/"):
        match = STATE_KEY_RE.search(obj["Key"])
        if match and obj["Key"] == keys.processor_state(prefix, int(match.group(1))):
            data = get_bytes(client, bucket, obj["Key"])
            if data is not None:
                states[int(match.group(1))] = json.loads(data)
    return states


def collect_partials(
    client: BaseClient, bucket: str, states: dict[int, dict[str, Any]], day: str, include_open: bool
) -> list[pl.DataFrame]:
    frames = []
    for state in states.values():
        key = state["outputs"].get(day)
        if key:
            frames.append(read_parquet(client, bucket, key))
        open_key = state["snapshot"].get("open")
        if include_open and open_key:
            frame = read_parquet(client, bucket, open_key)
            frames.append(frame.filter(day_of(pl.col("window_start").dt.epoch("ms")) == day))
    return frames


def results_for_day(
    client: BaseClient,
    bucket: str,
    prefix: str,
    pipeline: Pipeline,
    day: str,
    include_open: bool = False,
    states: dict[int, dict[str, Any]] | None = None,
) -> pl.DataFrame:
    """Output rows of ``day``: closed windows of every partition (plus open ones if asked), merged.

    Re-lists the states when an object vanished between reading a state and its data (a commit raced).
    """
    keys.valid_day(day)
    for attempt in range(3):
        states = list_states(client, bucket, prefix) if states is None or attempt else states
        try:
            frames = collect_partials(client, bucket, states, day, include_open)
            break
        except Fenced:
            if attempt == 2:
                raise
    frames = [f.cast(pipeline.partial_schema) for f in frames]  # type: ignore[arg-type]
    return pipeline.finalize(pl.concat(frames) if frames else pipeline.empty_partials())


def day_stats(states: dict[int, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per-day outcome counters summed over partitions."""
    total: dict[str, Counter[str]] = {}
    for state in states.values():
        for day, values in state["stats"].items():
            total.setdefault(day, Counter()).update(values)
    return {day: stats_dict(c) for day, c in sorted(total.items())}
