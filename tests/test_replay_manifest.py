"""The replay manifest's stored form: old manifests load, unknown keys survive, the ETag is never stored."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from workers.errors import KappaError
from workers.replay.manifest import ReplayManifest, from_json, processor_grace_ms, to_json

#: A manifest as the loader wrote it before the typed model (status consumed, one cleanup failure noted).
STORED = {
    "slot": "orders-v2-20261120-abcdef",
    "replay_id": "orders-v2-20261120-abcdef-r1",
    "pipeline": "orders",
    "version": 2,
    "day": "2026-11-20",
    "source_topic": "events",
    "replay_topic": "events.replay.orders-v2-20261120-abcdef-r1",
    "group": "kappa.orders.v2.replay.orders-v2-20261120-abcdef-r1",
    "partitions_requested": None,
    "partitioning": "source",
    "partitions": 3,
    "dlq_topic": "events.replay.orders-v2-20261120-abcdef-r1.dlq",
    "processor_prefix": "_state/processor/orders/v2/x/",
    "report_key": "reports/orders/v2/dt=2026-11-20/report.parquet",
    "source_fingerprint": "fp",
    "archive_fingerprint": "fp",
    "event_time_ordered": True,
    "source_files": 1,
    "source_objects": [["raw/events/dt=2026-11-20/a.parquet", 10, '"e1"']],
    "source_bytes": 10,
    "status": "consumed",
    "started_at": "2026-12-01T00:00:00+00:00",
    "records": 5,
    "rows_read": 6,
    "duplicates_dropped": 1,
    "end_offsets": {"0": 5},
    "source_end_offsets": {"0": 6},
    "loaded_at": "2026-12-01T00:00:01+00:00",
    "load_seconds": 0.5,
    "consumed_at": "2026-12-01T00:00:02+00:00",
    "report_etag": '"r1"',
    "stats_key": "reports/orders/v2/dt=2026-11-20/stats.json",
    "stats_etag": None,
    "cleaned": None,
    "superseded_not_cleaned": ["orders-v2-20261120-abcdef-r0: group not empty"],
}


def test_a_stored_manifest_round_trips_key_for_key() -> None:
    manifest = from_json(json.dumps(STORED), etag='"v1"')
    assert manifest.status == "consumed" and manifest.end_offsets == {"0": 5} and manifest.etag == '"v1"'
    assert manifest.extra == {}
    written = {k: v for k, v in STORED.items() if v is not None}  # a null and a missing key read the same
    assert json.loads(to_json(manifest)) == written  # same keys and values, nothing added


def test_unknown_keys_survive_a_read_modify_write_and_the_etag_is_never_stored() -> None:
    manifest = from_json(json.dumps({**STORED, "written_by_a_newer_loader": {"x": 1}}), etag='"v1"')
    assert manifest.extra == {"written_by_a_newer_loader": {"x": 1}}
    manifest.status = "reported"
    stored = json.loads(to_json(manifest))
    assert stored["written_by_a_newer_loader"] == {"x": 1} and stored["status"] == "reported"
    assert "etag" not in stored and "extra" not in stored and '"v1"' not in to_json(manifest).decode()


def test_a_manifest_from_before_later_fields_loads_with_their_defaults() -> None:
    old = {k: STORED[k] for k in ("replay_id", "pipeline", "version", "day", "source_topic", "status", "group")}
    manifest = from_json(json.dumps(old))
    assert manifest.slot is None and manifest.key == f"_state/replays/{old['replay_id']}/manifest.json"
    assert processor_grace_ms(manifest) is None  # no event_time_ordered: infinite grace, as before
    assert manifest.superseded_not_cleaned == [] and not manifest.cleaned and manifest.records is None
    assert json.loads(to_json(manifest)) == old  # defaults are not written back


def test_fields_set_to_a_false_or_empty_value_that_means_something_are_stored() -> None:
    manifest = replace(from_json(json.dumps(STORED)), status="reported", failed_checks=[], checks={"a": True})
    stored = json.loads(to_json(manifest))
    assert stored["failed_checks"] == [] and stored["checks"] == {"a": True}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({k: v for k, v in STORED.items() if k != "pipeline"}, "lacks pipeline"),
        ({**STORED, "status": "exploded"}, "unknown status 'exploded'"),
        ([1, 2], "JSON object"),
    ],
)
def test_a_malformed_manifest_fails_with_what_is_wrong(doc: object, message: str) -> None:
    with pytest.raises(KappaError, match=message):
        from_json(json.dumps(doc))


def test_equality_ignores_the_version_read_at() -> None:
    a = from_json(json.dumps(STORED), etag='"v1"')
    assert a == from_json(json.dumps(STORED), etag='"v2"')
    assert a != replace(a, records=6)
    assert isinstance(a, ReplayManifest)
