"""Archive compaction: one daily partition per run rewrites a closed day's small files into large ones.

The work is ``workers.archive.compaction`` (also ``kappa archive compact --day D``); readers switch at
one conditional pointer write per day, so replays and checks of the day may run at the same time.
A day that is not closed yet fails with one line saying when it will be.
"""

import dagster as dg

from kappa_dagster.defs.assets.raw_archive import raw_archive
from kappa_dagster.defs.partitions import OWNERS, daily_partitions
from kappa_dagster.defs.resources import KappaResource
from kappa_dagster.replay.step import user_errors
from workers.archive import compaction


class CompactionConfig(dg.Config):
    target_rows: int = compaction.DEFAULT_TARGET_ROWS
    #: replaced files stay readable this long after the switch (readers that listed before it)
    grace_s: float = compaction.DEFAULT_GRACE_S
    #: a day counts as closed this long after its end, once the archiver checkpointed past it
    close_after_s: float = compaction.DEFAULT_CLOSE_AFTER_S


@dg.asset(
    partitions_def=daily_partitions,
    group_name="archive",
    owners=OWNERS,
    kinds={"s3", "parquet"},
    deps=[raw_archive],
)
def archive_compaction(
    context: dg.AssetExecutionContext, config: CompactionConfig, kappa: KappaResource
) -> dg.MaterializeResult:
    """Rewrite a closed day's small raw files into large ones: same records byte for byte (verified
    before the switch), same data version; replaced files are deleted after the grace period."""
    settings = kappa.settings()
    with user_errors():
        result = compaction.compact_day(
            settings, context.partition_key, client=kappa.s3_client(settings), target_rows=config.target_rows,
            grace_s=config.grace_s, close_after_s=config.close_after_s,
        )
    context.log.info(f"{context.partition_key}: {result.reason}; {result.files_before} -> {result.files_after} files"
                     + (f"; {result.sweep_note}" if result.sweep_note else ""))
    return dg.MaterializeResult(metadata={
        "compacted": result.compacted,
        "reason": result.reason,
        "files_before": dg.MetadataValue.int(result.files_before),
        "files_after": dg.MetadataValue.int(result.files_after),
        "records": dg.MetadataValue.int(result.records),
        "digest": result.digest,
        "generation": dg.MetadataValue.int(result.generation),
        "replaced_files_deleted": dg.MetadataValue.int(result.swept),
        "sweep": result.sweep_note or "nothing waiting",
    })


archive_compaction_job = dg.define_asset_job(
    "archive_compaction_job",
    selection=dg.AssetSelection.assets(archive_compaction),
    executor_def=dg.in_process_executor,
    description="Compact one closed day of the raw archive (many small files -> few large ones).",
)
