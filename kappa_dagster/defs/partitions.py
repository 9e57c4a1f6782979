"""Daily partitions over the raw archive: one key per ``raw/<topic>/dt=<day>/`` prefix (UTC)."""

from __future__ import annotations

import os

import dagster as dg

from workers import keys

#: First day of the archive; override with ``KAPPA_PARTITIONS_START=YYYY-MM-DD``.
DEFAULT_START = "2026-11-01"


def partitions_start() -> str:
    return keys.valid_day(os.environ.get("KAPPA_PARTITIONS_START", DEFAULT_START))


#: ``end_offset=1`` includes today: late data for today can already be replayed.
daily_partitions = dg.DailyPartitionsDefinition(start_date=partitions_start(), end_offset=1, timezone="UTC")

#: Who to ask about these assets (shown in the Dagster UI's asset pages).
OWNERS = ["team:data-platform"]
