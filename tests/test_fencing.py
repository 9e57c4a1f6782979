"""Fencing at the S3 commit points, on the real S3 server: two writers of one partition, the stale one loses.

A "zombie" here is a store that read a checkpoint, was overtaken by another store's commit, and then
tries to commit from what it read. It must get :class:`workers.s3.Fenced` and leave the bucket
exactly as it found it; the winner's checkpoint must stay readable (nothing it names deleted).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import polars as pl
import pytest
from test_pipelines import consumed

from workers import keys
from workers.archive import format as archive_format
from workers.archive.archiver import ArchiveStore
from workers.config import Settings
from workers.pipelines import get_pipeline
from workers.processor.engine import apply, split_batch
from workers.processor.state import PartitionState, StateStore, list_states, results_for_day
from workers.s3 import Fenced, get_stored, iter_keys, put_if, still_at

BASE_MS = 1_795_000_000_000 - 1_795_000_000_000 % 86_400_000  # a UTC midnight
TOPIC = "events-fence"
GROUP = "kappa.orders.v2.live"


def list_keys(client: Any, bucket: str, prefix: str = "") -> dict[str, str]:
    """``{key: ETag}`` under ``prefix``: equal snapshots mean nothing was written, replaced or deleted."""
    return {obj["Key"]: obj["ETag"] for obj in iter_keys(client, bucket, prefix)}


# ---------------------------------------------------------------- the helper itself


def test_put_if_is_create_only_then_compare_and_swap(settings: Settings, s3: Any) -> None:
    bucket, key = settings.s3_bucket, "_state/probe.json"
    first = put_if(s3, bucket, key, b'{"seq": 1}', None)
    with pytest.raises(Fenced) as created_twice:
        put_if(s3, bucket, key, b'{"seq": 1, "other": true}', None)
    assert created_twice.value.current == b'{"seq": 1}'
    second = put_if(s3, bucket, key, b'{"seq": 2}', first)
    with pytest.raises(Fenced) as stale:
        put_if(s3, bucket, key, b'{"seq": 2, "zombie": true}', first)
    assert stale.value.current == b'{"seq": 2}', "the loser learns what it lost to"
    assert get_stored(s3, bucket, key).body == b'{"seq": 2}'
    # a PUT re-sent after a lost response answers 412 although it landed: still ours
    assert put_if(s3, bucket, key, b'{"seq": 2}', first) == second
    still_at(s3, bucket, key, second)
    with pytest.raises(Fenced):
        still_at(s3, bucket, key, first)
    with pytest.raises(Fenced):
        still_at(s3, bucket, key, None)
    still_at(s3, bucket, "_state/absent.json", None)
    s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(Fenced) as deleted:
        put_if(s3, bucket, key, b'{"seq": 3}', second)
    assert deleted.value.current is None


# ---------------------------------------------------------------- processor state


def feed(state: PartitionState, first: int, last: int) -> None:
    """Offsets ``first..last-1`` of partition 0: one order every 2 s, so windows close as it goes."""
    messages = [
        consumed(0, o, BASE_MS + 2_000 * o, json.dumps(
            {"event_id": f"e{o}", "user_id": "u", "type": "purchase", "amount": 1.0}).encode())
        for o in range(first, last)
    ]
    apply(split_batch(messages, state.pipeline).frame, state)


def fresh(store: StateStore) -> PartitionState:
    return store.load(PartitionState(get_pipeline("orders", 2), TOPIC, GROUP, 0, grace_ms=0))


def named_objects_exist(s3: Any, bucket: str, prefix: str) -> None:
    """Every object the committed state names exists (a reader never meets "vanished")."""
    doc = list_states(s3, bucket, prefix)[0]
    named = [*doc["outputs"].values(), *(k for k in doc["snapshot"].values() if k)]
    existing = list_keys(s3, bucket, prefix)
    assert named and all(key in existing for key in named), (named, sorted(existing))


def test_stale_state_store_is_fenced_and_nothing_it_writes_lands(settings: Settings, s3: Any) -> None:
    bucket, prefix = settings.s3_bucket, keys.processor_prefix("orders", 2, None)
    owner, zombie = StateStore(s3, bucket, prefix, "owner"), StateStore(s3, bucket, prefix, "zombie")
    ours, theirs = fresh(zombie), fresh(owner)
    feed(ours, 0, 100)
    feed(theirs, 0, 100)
    zombie.delete(zombie.commit(ours))  # the first checkpoint (create-only): the zombie-to-be wins it

    before = list_keys(s3, bucket)
    with pytest.raises(Fenced, match="lost to seq 1 of writer zombie"):
        owner.commit(theirs)  # also created the first checkpoint from nothing: too late
    assert list_keys(s3, bucket) == before, "the loser's outputs were deleted again"

    theirs = fresh(owner)  # what a fenced member does: drop its state, reload, continue
    assert (theirs.seq, theirs.writer, theirs.next_offset) == (1, "zombie", 100)
    feed(theirs, 100, 200)
    owner.delete(owner.commit(theirs))  # seq 2, and seq 1's superseded objects deleted

    feed(ours, 100, 300)  # the zombie wakes up with more work done from seq 1
    before = list_keys(s3, bucket)
    with pytest.raises(Fenced, match=r"commit of seq 2 by writer zombie .* lost to seq 2 of writer owner"):
        zombie.commit(ours)
    assert list_keys(s3, bucket) == before, "nothing the zombie wrote landed"
    doc = list_states(s3, bucket, prefix)[0]
    assert (doc["seq"], doc["writer"], doc["next_offset"]) == (2, "owner", 200)
    named_objects_exist(s3, bucket, prefix)
    day = dt.datetime.fromtimestamp(BASE_MS / 1000, dt.UTC).date().isoformat()
    results = results_for_day(s3, bucket, prefix, get_pipeline("orders", 2), day, include_open=True)
    assert results["events"].sum() == 200, "offsets 0..199 counted once each"


# ---------------------------------------------------------------- archiver checkpoint


def archive_rows(partition: int, first: int, last: int) -> pl.DataFrame:
    count = last - first
    return archive_format.frame_from_columns({
        "topic": [TOPIC] * count, "partition": [partition] * count, "offset": list(range(first, last)),
        "timestamp": [BASE_MS + o for o in range(first, last)], "timestamp_type": [1] * count,
        "key": [None] * count, "value": [f"v{o}".encode() for o in range(first, last)], "headers": [[]] * count,
    })


def flush(store: ArchiveStore, first: int, last: int) -> None:
    files, _size = store.write_files(0, archive_rows(0, first, last))
    store.write_checkpoint(0, last, "g", files)


def test_stale_archive_store_is_fenced_and_nothing_it_writes_lands(settings: Settings, s3: Any) -> None:
    bucket = settings.s3_bucket
    owner, zombie = ArchiveStore(s3, bucket, TOPIC), ArchiveStore(s3, bucket, TOPIC)
    assert zombie.read_checkpoint(0) is None and owner.read_checkpoint(0) is None
    flush(zombie, 0, 100)  # the first checkpoint (create-only)

    before = list_keys(s3, bucket)
    with pytest.raises(Fenced):
        owner.write_files(0, archive_rows(0, 0, 150))  # checked before any file is written
    with pytest.raises(Fenced):
        owner.write_checkpoint(0, 150, "g", [])
    assert list_keys(s3, bucket) == before

    assert owner.read_checkpoint(0) == 100  # the fenced member re-reads and takes over
    flush(owner, 100, 200)
    before = list_keys(s3, bucket)
    with pytest.raises(Fenced):
        zombie.write_files(0, archive_rows(0, 100, 300))  # the zombie wakes with a stale buffer
    assert list_keys(s3, bucket) == before, "no zombie file landed"

    # the narrow race: the zombie's check passed, then the owner committed before the zombie's checkpoint
    stale = ArchiveStore(s3, bucket, TOPIC)
    assert stale.read_checkpoint(0) == 200
    files, _size = stale.write_files(0, archive_rows(0, 200, 260))
    flush(owner, 200, 300)
    with pytest.raises(Fenced):
        stale.write_checkpoint(0, 260, "g", files)
    checkpoint = json.loads(get_stored(s3, bucket, keys.archiver_checkpoint(TOPIC, 0)).body)
    assert checkpoint["next_offset"] == 300 and checkpoint["files"] != files
    assert owner.read_checkpoint(0) == 300


def test_archive_store_refuses_a_checkpoint_it_never_read(settings: Settings, s3: Any) -> None:
    """A write for a partition this member was not assigned (or forgot at revoke) is fenced, not blind."""
    store = ArchiveStore(s3, settings.s3_bucket, TOPIC)
    with pytest.raises(Fenced, match="not assigned here"):
        store.write_checkpoint(0, 10, "g", [])
    store.read_checkpoint(0)
    store.forget(0)
    with pytest.raises(Fenced):
        store.write_files(0, archive_rows(0, 0, 10))
    assert list_keys(s3, settings.s3_bucket) == {}
