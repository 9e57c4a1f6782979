"""The raw archive (DESIGN §2): written by the archiver, observed here, never materialized by Dagster."""

from typing import Any

import dagster as dg

from kappa_dagster.defs.partitions import OWNERS, daily_partitions

raw_archive = dg.AssetSpec(
    "raw_archive",
    partitions_def=daily_partitions,
    owners=OWNERS,
    group_name="archive",
    kinds={"s3", "parquet"},
    description="s3://BUCKET/raw/<topic>/dt=<day>/: every Kafka record of the day, byte-exact (source of truth). "
    "Observed by the raw_archive_sensor and by each replay load (objects, bytes, rows).",
)


def observation(day: str, summary: dict[str, Any], **extra: Any) -> dg.AssetObservation:
    """An observation of one day's prefix: what the UI shows per partition."""
    metadata: dict[str, Any] = {
        "objects": dg.MetadataValue.int(summary["objects"]),
        "bytes": dg.MetadataValue.int(summary["bytes"]),
        **{k: v for k, v in extra.items() if v is not None},
    }
    if summary.get("rows") is not None:
        metadata["rows"] = dg.MetadataValue.int(summary["rows"])
    return dg.AssetObservation(asset_key=raw_archive.key, partition=day, metadata=metadata)
