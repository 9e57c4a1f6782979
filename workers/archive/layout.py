"""Which objects make up one day of the raw archive: the one function every reader lists a day through.

A day without compaction is every ``raw/<topic>/dt=<day>/part=<p>/<first>-<last>.parquet`` object,
exactly as the archiver writes it. Compaction (``workers/archive/compaction.py``) writes larger
files with the same naming next to the small ones and switches readers over with ONE pointer object
per day, ``raw/<topic>/dt=<day>/~compaction.json``, replaced only by conditional writes:

* ``pending``: keys of compacted files being written (not yet part of the day);
* ``replaced``: ``[key, size, etag]`` of files the compacted ones replaced (no longer part of the day,
  deleted after a grace period);
* ``objects``: the compacted files, each with the ``[key, size, etag]`` triples it ``stands_for``
  (so the day's fingerprint, its data version, stays that of the records, not of their packing).

A day's view is the listing minus ``pending`` minus ``replaced``. The pointer's key sorts after every
data file of the day (``~`` > ``p``), and a reader GETs it before listing and compares the ETag the
listing shows at its end: an unchanged pointer means the whole listing saw one state (pending files
appear only after the pointer names them, replaced files vanish only after the pointer dropped them
... and the grace period), otherwise the reader lists again. Late files the archiver adds to a day
after its compaction are neither pending nor replaced, so they are read as before.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from workers import keys
from workers import s3 as s3_helpers
from workers.errors import KappaError

POINTER_NAME = "~compaction.json"
#: Listings retried when the pointer changed while listing (a compaction switching right then).
LIST_ATTEMPTS = 5

Triple = list  # [key: str, size: int, etag: str]


def pointer_key(topic: str, day: str) -> str:
    """The day's compaction pointer; sorts after every ``part=`` object of the day."""
    return f"{keys.raw_day_prefix(topic, day)}{POINTER_NAME}"


@dataclass
class DayPointer:
    """The state of a day's compaction (see the module docstring); ``etag`` is the stored version."""

    generation: int = 0
    state: str = "compacted"  # "compacting" while pending files are written, then "compacted"
    pending: list[str] = field(default_factory=list)
    replaced: list[Triple] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)  # {key, size, etag, stands_for: [triples]}
    records: int = 0
    digest: str = ""
    owner: str = ""
    started_at_ms: int = 0
    switched_at_ms: int = 0
    swept_at_ms: int = 0
    etag: str | None = field(default=None, compare=False)

    def hidden(self) -> tuple[set[str], set[tuple[str, str]]]:
        """Keys readers skip (pending) and (key, etag) versions they skip (replaced)."""
        return set(self.pending), {(str(t[0]), str(t[2]).strip('"')) for t in self.replaced}


def read_pointer(client: Any, bucket: str, topic: str, day: str) -> DayPointer | None:
    stored = s3_helpers.get_stored(client, bucket, pointer_key(topic, day))
    if stored is None:
        return None
    doc = json.loads(stored.body)
    if not isinstance(doc, dict) or doc.get("state") not in {"compacting", "compacted"}:
        raise KappaError(f"s3://{bucket}/{pointer_key(topic, day)} is not a compaction pointer: move it aside")
    known = DayPointer.__dataclass_fields__
    pointer = DayPointer(**{k: v for k, v in doc.items() if k in known and k != "etag"})
    pointer.etag = stored.etag
    return pointer


def write_pointer(client: Any, bucket: str, topic: str, day: str, pointer: DayPointer) -> DayPointer:
    """Replace the pointer only if it is still at ``pointer.etag`` (create-only when None); Fenced otherwise."""
    body = {k: v for k, v in asdict(pointer).items() if k != "etag"}
    body["written_at_ms"] = int(time.time() * 1000)  # every write's body differs, so ETags never repeat
    pointer.etag = s3_helpers.put_if(client, bucket, pointer_key(topic, day), json.dumps(body).encode(), pointer.etag)
    return pointer


def _listing(client: Any, bucket: str, topic: str, day: str) -> tuple[list[dict], str | None]:
    """Raw data files of the day (all of them) and the pointer's ETag as the listing saw it last."""
    files, pointer_etag = [], None
    wanted = pointer_key(topic, day)
    for obj in s3_helpers.iter_keys(client, bucket, keys.raw_day_prefix(topic, day)):
        if obj["Key"] == wanted:
            pointer_etag = str(obj.get("ETag", ""))
            continue
        parts = keys.parse_raw_file(obj["Key"])
        if parts is not None:
            files.append({**parts, "key": obj["Key"], "size": obj["Size"], "etag": str(obj.get("ETag", ""))})
    return files, pointer_etag


def _same_etag(a: str | None, b: str | None) -> bool:
    return (a or "").strip('"') == (b or "").strip('"')


def resolve(files: list[dict], pointer: DayPointer | None) -> list[dict]:
    """The day's view of a listing under one pointer state, ordered by partition and first offset.

    Compacted objects carry ``fingerprint_as`` (the triples they stand for), which
    ``archive/stats.files_fingerprint`` uses, so compaction leaves the data version unchanged.
    """
    if pointer is not None:
        pending, replaced = pointer.hidden()
        stands_for = {o["key"]: (str(o["etag"]), o.get("stands_for") or []) for o in pointer.objects}
        view = []
        for f in files:
            if f["key"] in pending or (f["key"], f["etag"].strip('"')) in replaced:
                continue
            etag, triples = stands_for.get(f["key"], ("", None))
            view.append({**f, "fingerprint_as": triples} if triples is not None and _same_etag(etag, f["etag"]) else f)
        files = view
    return sorted(files, key=lambda f: (f["partition"], f["first_offset"], f["last_offset"]))


def day_view(client: Any, bucket: str, topic: str, day: str) -> tuple[list[dict], DayPointer | None]:
    """The day's objects as one consistent snapshot, and the pointer state it was taken under."""
    for _ in range(LIST_ATTEMPTS):
        pointer = read_pointer(client, bucket, topic, day)
        files, listed_etag = _listing(client, bucket, topic, day)
        if _same_etag(pointer.etag if pointer else None, listed_etag):
            return resolve(files, pointer), pointer
    raise KappaError(f"the compaction pointer of {day} kept changing during {LIST_ATTEMPTS} listings: try again")


def day_files(client: Any, bucket: str, topic: str, day: str) -> list[dict]:
    """The archive objects of one day (compaction resolved), ordered by partition and first offset."""
    return day_view(client, bucket, topic, day)[0]


def days_objects(client: Any, bucket: str, topic: str) -> dict[str, list[dict]]:
    """Every day of the archive -> its view, from one listing; days with a pointer are listed again alone.

    A day whose pointer is absent at the end of its part of the listing had no compaction under way
    while its files were listed (pending files appear only after the pointer does).
    """
    listed: dict[str, list[dict]] = {}
    compacted: set[str] = set()
    for obj in s3_helpers.iter_keys(client, bucket, keys.raw_topic_prefix(topic)):
        parts = keys.parse_raw_file(obj["Key"])
        if parts is not None:
            row = {**parts, "key": obj["Key"], "size": obj["Size"], "etag": str(obj.get("ETag", ""))}
            listed.setdefault(str(parts["day"]), []).append(row)
        elif obj["Key"].endswith(f"/{POINTER_NAME}"):
            compacted.add(obj["Key"][: -len(POINTER_NAME) - 1].rsplit("dt=", 1)[-1])
    out = {day: resolve(files, None) for day, files in listed.items()}
    for day in compacted:
        out[day] = day_files(client, bucket, topic, day)
    return {day: files for day, files in out.items() if files}


def pinned_files(client: Any, bucket: str, topic: str, day: str, objects: list) -> list[dict]:
    """``[key, size, etag]`` triples a replay recorded -> file rows, compacted ones with what they stand for,
    so a pinned snapshot has the same fingerprint as the listing it was recorded from."""
    pointer = read_pointer(client, bucket, topic, day)
    stands_for = {} if pointer is None else {
        (o["key"], str(o["etag"]).strip('"')): o.get("stands_for") or [] for o in pointer.objects}
    rows = []
    for key, size, etag in objects:
        row: dict[str, Any] = {"key": key, "size": size, "etag": etag}
        triples = stands_for.get((key, str(etag).strip('"')))
        rows.append(row if triples is None else {**row, "fingerprint_as": triples})
    return rows
