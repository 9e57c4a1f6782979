"""The raw archive as an observable asset: the archiver writes it, Dagster only observes it.

Each day's data version is its fingerprint (keys, sizes, ETags), so late records arriving in a day
mark that day's replay and corrected report stale in the UI (docs/ARCHITECTURE.md, "Stale days").
"""

import warnings
from typing import Any

import dagster as dg

from kappa_dagster.defs.partitions import daily_partitions
from workers.archive import stats as archive_stats

#: the tag Dagster reads an observation's data version from (``dagster._core.definitions.data_version``)
DATA_VERSION_TAG = "dagster/data_version"


def _observe(context: dg.OpExecutionContext) -> dg.DataVersionsByPartition:
    """Observe every day's prefix from one listing: the data version is the day's fingerprint."""
    kappa = context.resources.kappa
    settings = kappa.settings()
    fingerprints = archive_stats.days_fingerprints(kappa.s3_client(settings), settings.s3_bucket, settings.events_topic)
    known = set(daily_partitions.get_partition_keys())
    return dg.DataVersionsByPartition({day: fp for day, fp in fingerprints.items() if day in known})


with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)  # observable source assets are beta; this is their use
    raw_archive = dg.observable_source_asset(
        name="raw_archive",
        partitions_def=daily_partitions,
        group_name="archive",
        required_resource_keys={"kappa"},
        tags={"dagster/kind/s3": "", "dagster/kind/parquet": ""},
        description="s3://BUCKET/raw/<topic>/dt=<day>/: every Kafka record of the day, byte-exact (source of truth). "
        "Observed by the raw_archive_sensor and by each replay load (objects, bytes, rows); its data version per "
        "day is the fingerprint of the day's objects (keys, sizes, ETags).",
    )(_observe)


def observation(
    day: str, summary: dict[str, Any], data_version: str | None = None, **extra: Any
) -> dg.AssetObservation:
    """An observation of one day's prefix: what the UI shows per partition, with its data version."""
    metadata: dict[str, Any] = {
        "objects": dg.MetadataValue.int(summary["objects"]),
        "bytes": dg.MetadataValue.int(summary["bytes"]),
        **{k: v for k, v in extra.items() if v is not None},
    }
    if summary.get("rows") is not None:
        metadata["rows"] = dg.MetadataValue.int(summary["rows"])
    tags = {} if data_version is None else {DATA_VERSION_TAG: data_version}
    metadata.update({"fingerprint": data_version} if data_version else {})
    return dg.AssetObservation(asset_key=raw_archive.key, partition=day, metadata=metadata, tags=tags)
