"""The archiver checkpoint's JSON contract: what older archivers wrote still loads, a broken one is refused."""

import json

import pytest

from workers.archive import checkpoint as archiver_checkpoint
from workers.archive.checkpoint import ArchiverCheckpoint
from workers.errors import KappaError


def test_a_checkpoint_round_trips_with_the_stored_key_names() -> None:
    written = ArchiverCheckpoint("events", 2, 1234, "tid", "kappa.archiver", files=["raw/a.parquet"])
    stored = json.loads(archiver_checkpoint.to_json(written))
    assert {"topic", "partition", "next_offset", "topic_id", "group", "writer", "written_at_ms", "files"} == set(stored)
    assert stored["next_offset"] == 1234 and stored["files"] == ["raw/a.parquet"]
    assert archiver_checkpoint.from_json(archiver_checkpoint.to_json(written)) == written


def test_a_checkpoint_without_topic_id_from_an_older_archiver_loads() -> None:
    old = json.dumps({"topic": "events", "partition": 0, "next_offset": 7, "group": "g", "files": []})
    loaded = archiver_checkpoint.from_json(old)
    assert loaded.next_offset == 7 and loaded.topic_id is None
    # topic and partition come from the key when the body lacks them
    bare = archiver_checkpoint.from_json('{"next_offset": 3}', "events", 4)
    assert (bare.topic, bare.partition, bare.next_offset) == ("events", 4, 3)


@pytest.mark.parametrize("body", ['{"topic": "events", "partition": 0}', "[]", '{"next_offset": "3"}'])
def test_a_checkpoint_without_its_position_is_refused_with_one_line(body: str) -> None:
    with pytest.raises(KappaError, match="next_offset"):
        archiver_checkpoint.from_json(body)
