"""Replay progress from offsets only: committed offsets of the replay group vs the manifest's end offsets."""

from __future__ import annotations

from typing import Any

from workers.config import Settings
from workers.lag import LagReader
from workers.replay.manifest import ReplayManifest


def progress(settings: Settings, manifest: ReplayManifest) -> dict[str, Any]:
    """Lag and percent done of one replay (reads committed offsets through AdminClient; never consumes)."""
    end = {int(p): int(o) for p, o in (manifest.end_offsets or {}).items()}
    group = LagReader(settings).group_lag(manifest.group, manifest.replay_topic, end=end)
    assert group is not None  # end offsets are given, so there is always an answer
    committed = {p: min(group.committed.get(p) or 0, o) for p, o in end.items()}
    total = sum(end.values())
    lag = total - sum(committed.values())
    return {
        "lag": lag,
        "total": total,
        "done": total - lag,
        "percent_done": 100.0 if total == 0 else round(100.0 * (total - lag) / total, 2),
        "committed": {str(p): committed[p] for p in sorted(end)},
    }
