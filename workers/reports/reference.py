"""The independent reference of a corrected report: the pipeline's own SQL, run by DuckDB over the archive.

It shares no code with the engine (DuckDB, not polars; its own S3 reads of one ETag snapshot), so an
engine or parsing bug cannot make both sides wrong alike. The SQL contract is in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import duckdb

from workers import s3 as s3_helpers
from workers import spill
from workers.archive import format as archive_format
from workers.archive import layout as archive_layout
from workers.archive import stats as archive_stats
from workers.errors import KappaError
from workers.pipelines.base import Pipeline

OUTCOMES = ("counted", "dlq", "duplicates")
MEMORY_LIMIT = "512MB"


class SnapshotChanged(KappaError):
    """An archive object changed between the listing and its read: the day is being rewritten."""


@dataclass
class Snapshot:
    """One day's archive objects as downloaded, and the fingerprint of exactly those versions."""

    day: str
    fingerprint: str
    paths: list[Path]


@dataclass
class Reference:
    """The reference report (rows as Python values, timestamps as epoch ms) and outcome counts."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    outcomes: dict[str, int]
    records: int
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def reference_sql(pipeline: Pipeline) -> str:
    """The pipeline's SQL definition, or a clear error: without one, its reports cannot be published."""
    name = getattr(pipeline, "reference_sql", None)
    if not name:
        raise KappaError(f"pipeline {pipeline.label} ships no reference SQL (Pipeline.reference_sql): "
                         "its reports cannot be checked, so they are never published")
    owner = next(cls for cls in type(pipeline).__mro__ if "reference_sql" in vars(cls))  # who declared it
    return (Path(inspect.getfile(owner)).parent / name).read_text()


@contextmanager
def snapshot(client: Any, bucket: str, topic: str, day: str, objects: list | None = None) -> Iterator[Snapshot]:
    """Download the day's archive into a temporary directory, every object at the version listed.

    ``objects`` (``[key, size, etag]`` triples, as a replay manifest records them) pins an earlier
    snapshot: objects added since are left out, an object rewritten or removed since fails the read.
    """
    if objects is None:
        files = archive_format.day_files(client, bucket, topic, day)
    else:
        files = archive_layout.pinned_files(client, bucket, topic, day, objects)
    if not files:
        raise KappaError(f"no raw archive objects for {day}: nothing to compare with")
    with spill.spill_dir(f"reference-{day}") as tmp:
        paths = []
        for index, file in enumerate(files):
            try:
                body = s3_helpers.get_if(client, bucket, file["key"], file["etag"])
            except s3_helpers.Fenced:
                raise SnapshotChanged(f"archive object {file['key']} changed while reading {day}: retry") from None
            path = tmp / f"{index:06d}.parquet"
            path.write_bytes(body)
            paths.append(path)
        yield Snapshot(day, archive_stats.files_fingerprint(files), paths)


def _connect(directory: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "temp_directory": str(directory), "threads": 2})


def _plain(con: duckdb.DuckDBPyConnection, relation: str, order_by: list[str]) -> tuple[list[str], list[tuple]]:
    """Rows of a relation with timestamps as epoch milliseconds, so both sides compare as plain values."""
    described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
    select = [
        f'epoch_ms("{name}") AS "{name}"' if str(kind).startswith("TIMESTAMP") else f'"{name}"'
        for name, kind, *_ in described
    ]
    order = ", ".join(f'"{c}"' for c in order_by)
    rows = con.execute(f"SELECT {', '.join(select)} FROM {relation} ORDER BY {order}").fetchall()
    return [name for name, *_ in described], rows


def compute(pipeline: Pipeline, snap: Snapshot) -> Reference:
    """Run the pipeline's SQL over the snapshot (DuckDB's own Parquet reader and JSON functions)."""
    sql = reference_sql(pipeline)
    with spill.spill_dir("reference-duckdb") as folder:
        con = _connect(folder)
        try:
            files = ", ".join(f"'{p}'" for p in snap.paths)
            con.execute(f"CREATE TEMP VIEW archive AS SELECT * FROM read_parquet([{files}])")
            # a crash may leave overlapping archive files: a record is its (topic, partition, offset)
            con.execute(
                'CREATE TEMP VIEW records AS SELECT * FROM archive '
                'QUALIFY row_number() OVER (PARTITION BY topic, "partition", "offset") = 1'
            )
            for name, value in getattr(pipeline, "reference_params", {}).items():
                con.execute(f"SET VARIABLE {name} = ?", [value])
            con.execute(sql)
            columns, rows = _plain(con, "report", pipeline.key_columns)
            outcomes = dict.fromkeys(OUTCOMES, 0)
            outcomes.update(dict(con.execute("SELECT outcome, count(*) FROM outcomes GROUP BY outcome").fetchall()))
            records = con.execute("SELECT count(*) FROM records").fetchone()[0]  # type: ignore[index]
        finally:
            con.close()
    return Reference(columns, rows, outcomes, int(records), snap.fingerprint)


# its own reader, not workers.processor.results: an oracle shares no code with what it checks
def read_report(report: bytes, key_columns: list[str]) -> tuple[list[str], list[tuple]]:
    """The written report.parquet as plain rows, read by DuckDB (not by the engine's polars)."""
    with tempfile.TemporaryDirectory(prefix="reference-report-") as tmp:
        path = Path(tmp) / "report.parquet"
        path.write_bytes(report)
        con = _connect(Path(tmp))
        try:
            return _plain(con, f"read_parquet('{path}')", key_columns)
        finally:
            con.close()


def same_value(got: Any, want: Any) -> bool:
    """Exact equality; an f64 output against an exact decimal must be that decimal correctly rounded
    (one unit in the last place of slack for sums beyond 2^53 micro-units, which f64 cannot hold)."""
    if isinstance(want, Decimal) and isinstance(got, float):
        exact = float(Fraction(want))
        return got == exact or (math.isfinite(got) and abs(got - exact) <= math.ulp(exact))
    return bool(got == want)


def mismatches(
    report_columns: list[str], report_rows: list[tuple], ref: Reference, key_columns: list[str]
) -> list[dict[str, Any]]:
    """Rows on one side only or with a different value, as dicts (``side``: report/reference/both)."""
    if report_columns != ref.columns:
        return [{"side": "schema", "report": report_columns, "reference": ref.columns}]
    keys = [report_columns.index(c) for c in key_columns]
    mine = {tuple(row[i] for i in keys): row for row in report_rows}
    theirs = {tuple(row[i] for i in keys): row for row in ref.rows}
    wrong: list[dict[str, Any]] = []
    if len(mine) != len(report_rows):
        wrong.append({"side": "report", "problem": f"{len(report_rows) - len(mine)} repeated key rows"})
    for key in sorted(set(mine) | set(theirs), key=repr):
        got, want = mine.get(key), theirs.get(key)
        if got is None or want is None or not all(same_value(g, w) for g, w in zip(got, want, strict=True)):
            side = "reference only" if got is None else "report only" if want is None else "differs"
            wrong.append({"side": side, "key": key, "report": got, "reference": want})
    return wrong
