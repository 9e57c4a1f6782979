"""The switch at promote: which records the corrected reports count, which the live processor counts.

It exists so that what users read for a day is corrected + live with no record in neither part and
none in both (docs/ARCHITECTURE.md, "The handoff at promote").
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from workers import keys
from workers import s3 as s3_helpers
from workers.errors import KappaError
from workers.pipelines import Pipeline, get_pipeline
from workers.processor import state as processor_state
from workers.replay.manifest import ReplayManifest

ORIGIN_FILE = "_state/origin.json"


@dataclass(frozen=True)
class Switch:
    """Where the corrected reports end and the live processor begins (see the module docstring)."""

    start: dict[int, int]
    covered: dict[str, dict[int, int]]

    @classmethod
    def plan(cls, manifests: list[ReplayManifest], partitions: int) -> Switch:
        """From the reported replays of the promoted days (the newest per day wins) and the partition count."""
        newest = sorted(manifests, key=lambda m: m.started_at or "")
        covered = {m.day: {int(p): int(o) for p, o in (m.source_end_offsets or {}).items()} for m in newest}
        start = {p: min((bounds.get(p, 0) for bounds in covered.values()), default=0) for p in range(partitions)}
        return cls(start, covered)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Switch:
        return cls(
            {int(p): int(o) for p, o in doc["start"].items()},
            {day: {int(p): int(o) for p, o in bounds.items()} for day, bounds in doc["covered"].items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "start": {str(p): o for p, o in sorted(self.start.items())},
            "covered": {d: {str(p): o for p, o in sorted(b.items())} for d, b in sorted(self.covered.items())},
        }

    @property
    def origin(self) -> str:
        """Identity of this switch: a live checkpoint made from another one is an old checkpoint."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:20]

    def covered_rows(self, partition: int, day: pl.Expr, offset: pl.Expr) -> pl.Expr:
        """True for the records of ``partition`` that a promoted day's corrected report already counts."""
        expr = pl.lit(False)
        for covered_day, bounds in self.covered.items():
            if bounds.get(partition, 0) > 0:
                expr = expr | ((day == covered_day) & (offset < bounds[partition]))
        return expr


def read_pointer(client: Any, bucket: str, pipeline: str) -> dict[str, Any] | None:
    """``reports/<P>/CURRENT`` (owned by ``workers.promote``; read here without importing it)."""
    body = s3_helpers.get_bytes(client, bucket, keys.current_pointer(pipeline))
    return json.loads(body) if body else None


def switch_of(pointer: dict[str, Any]) -> Switch:
    """The switch a ``CURRENT`` pointer records (pointers written before it existed have none)."""
    if "switch" not in pointer:
        raise KappaError(
            f"reports/{pointer['pipeline']}/CURRENT has no switch (promoted by an older version): promote again"
        )
    return Switch.from_json(pointer["switch"])


def promoted_switch(client: Any, bucket: str, pipeline: str, version: int) -> Switch:
    """The switch of the promoted ``version`` (what ``kappa processor --handoff`` starts from)."""
    pointer = read_pointer(client, bucket, pipeline)
    if pointer is None or int(pointer["version"]) != version:
        promoted = "nothing" if pointer is None else f"v{pointer['version']}"
        raise KappaError(f"--handoff needs {pipeline} v{version} promoted; reports/{pipeline}/CURRENT names {promoted}")
    return switch_of(pointer)


def claim_live_prefix(client: Any, bucket: str, prefix: str, origin: str) -> bool:
    """Make an explicit start win over an older checkpoint: clear ``prefix`` unless it was made from ``origin``.

    Returns True when an old checkpoint was removed. Restarts with the same start keep their checkpoint.
    """
    key = prefix + ORIGIN_FILE
    body = s3_helpers.get_bytes(client, bucket, key)
    if body is not None and json.loads(body).get("origin") == origin:
        return False
    old = [obj["Key"] for obj in s3_helpers.iter_keys(client, bucket, prefix)]
    for first in range(0, len(old), 1000):
        batch = [{"Key": k} for k in old[first : first + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    doc = json.dumps({"origin": origin}).encode()
    client.put_object(Bucket=bucket, Key=key, Body=doc, ContentType="application/json")
    return bool(old)


def corrected_partials(client: Any, bucket: str, pipeline: Pipeline, day: str, etag: str | None) -> pl.DataFrame:
    """The corrected report of ``day`` as partials (its output columns are the partial columns)."""
    key = keys.report_file(pipeline.name, pipeline.version, day)
    head = client.head_object(Bucket=bucket, Key=key)
    if etag is not None and head["ETag"] != etag:
        raise KappaError(
            f"s3://{bucket}/{key} was recomputed after the promote: promote {pipeline.label} again to serve it"
        )
    if pipeline.output_schema.names() != pipeline.partial_schema.names():
        raise KappaError(f"{pipeline.label}: its output rows are not partials, the served report cannot merge them")
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return pl.read_parquet(io.BytesIO(body)).cast(pipeline.partial_schema)  # type: ignore[arg-type]


def served_report(client: Any, bucket: str, pipeline: str, day: str) -> tuple[int, pl.DataFrame]:
    """What users read for ``day``: the promoted version's corrected part merged with its live part."""
    keys.valid_day(day)
    pointer = read_pointer(client, bucket, pipeline)
    if pointer is None:
        raise KappaError(f"{pipeline} has no promoted version (reports/{pipeline}/CURRENT): read the live results")
    impl = get_pipeline(pipeline, int(pointer["version"]))
    switch = switch_of(pointer)
    parts = []
    if day in switch.covered:
        parts.append(corrected_partials(client, bucket, impl, day, pointer.get("report_etags", {}).get(day)))
    prefix = keys.processor_prefix(impl.name, impl.version, None)
    states = processor_state.list_states(client, bucket, prefix)
    live = processor_state.collect_partials(client, bucket, states, day, include_open=True)
    parts += [frame.cast(impl.partial_schema) for frame in live]  # type: ignore[arg-type]
    return impl.version, impl.finalize(pl.concat(parts) if parts else impl.empty_partials())
