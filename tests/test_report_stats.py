"""The report stats model: what the processor always wrote, byte for byte; a partial file is refused."""

from __future__ import annotations

import json

import pytest

from workers.errors import KappaError
from workers.pipelines.base import STAT_NAMES
from workers.reports.stats import ReportStats, from_json, to_json

#: stats.json as the processor wrote it before the model (``json.dumps(stats_dict(...), indent=1)``).
STORED = b'{\n "records": 10,\n "counted": 6,\n "dlq": 1,\n "duplicates": 2,\n "late": 1\n}'


def test_the_stored_form_is_unchanged_and_round_trips() -> None:
    stats = ReportStats.of({"late": 1, "records": 10, "duplicates": 2, "counted": 6, "dlq": 1})
    assert to_json(stats) == STORED
    assert from_json(STORED) == stats and stats.as_dict()["counted"] == 6


def test_a_counter_the_processor_never_saw_is_zero() -> None:
    assert ReportStats.of({"records": 3, "counted": 3}) == ReportStats(3, 3, 0, 0, 0)


@pytest.mark.parametrize(("body", "message"), [(b'{"records": 1}', "lack counted, dlq"), (b"[]", "JSON object")])
def test_a_partial_or_malformed_file_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(KappaError, match=message):
        from_json(body)


def test_unknown_counters_do_not_break_reading() -> None:
    assert from_json(json.dumps({**json.loads(STORED), "future": 5})) == from_json(STORED)


def test_the_counters_are_the_pipelines_stat_names() -> None:
    assert tuple(ReportStats.of({}).as_dict()) == STAT_NAMES
