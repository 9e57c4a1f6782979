"""Jobs: reprocess one day (load -> consume -> report; a backfill's range as one run), report only (for the
sensor), promote, rollback.

Pick the version per run with the tag ``kappa/version`` (default 2), e.g.
``dagster job execute -m kappa_dagster -j reprocess \
--tags '{"dagster/partition": "2026-11-20", "kappa/version": "2"}'``.
"""

import dagster as dg

from kappa_dagster.defs.assets.replay import replay_consume, replay_load
from kappa_dagster.defs.assets.reports import corrected_report
from kappa_dagster.defs.resources import KappaResource
from kappa_dagster.replay.step import user_errors
from kappa_dagster.replay.target import REPLAY_TAG
from workers import promote

reprocess = dg.define_asset_job(
    "reprocess",
    selection=dg.AssetSelection.assets(replay_load, replay_consume, corrected_report),
    tags={REPLAY_TAG: "true"},  # dagster.yaml limits concurrent runs with this tag
    executor_def=dg.in_process_executor,  # steps are sequential: skip a process start per step
    description="Reprocess one day from the S3 archive through Kafka with the pipeline version of tag "
    "kappa/version (default 2) and write its corrected report; a backfill over many days is one run "
    "(one replay topic and consumer group, a report and checks per day).",
)

corrected_report_job = dg.define_asset_job(
    "corrected_report_job",
    selection=dg.AssetSelection.assets(corrected_report),
    executor_def=dg.in_process_executor,
    description="Validate and publish the corrected report of a day whose replay consumer reached the end.",
)


class PromoteConfig(dg.Config):
    pipeline: str = "orders"
    version: int = 2
    #: refuse when more (window, group) rows differ from what users read for no known cause (None: no diff)
    max_unexplained: int | None = 0


class RollbackConfig(dg.Config):
    pipeline: str = "orders"


@dg.op
def promote_version(context: dg.OpExecutionContext, config: PromoteConfig, kappa: KappaResource) -> None:
    """Point reports/<P>/CURRENT at the version and record the live start offsets."""
    settings = kappa.settings()
    with user_errors():
        pointer = promote.promote(
            kappa.s3_client(settings),
            settings.s3_bucket,
            settings.events_topic,
            config.pipeline,
            config.version,
            max_unexplained=config.max_unexplained,
            settings=settings,
        )
    for line in pointer["diffs"].values():
        context.log.info(f"diff {line}")
    context.log.info(
        f"{config.pipeline} CURRENT -> v{config.version}; live start offsets {pointer['live_start_offsets']}"
    )
    if pointer["uncovered_days"]:
        context.log.warning(
            f"uncovered days (archived, not replayed, records below the switch in no v{config.version} report): "
            + ", ".join(pointer["uncovered_days"])
        )
    context.log.info(
        f"start its live processor with: kappa processor --pipeline {config.pipeline} --version {config.version} "
        "--handoff"
    )


@dg.op
def rollback_version(context: dg.OpExecutionContext, config: RollbackConfig, kappa: KappaResource) -> None:
    """Restore the previous CURRENT pointer."""
    settings = kappa.settings()
    with user_errors():
        restored = promote.rollback(kappa.s3_client(settings), settings.s3_bucket, config.pipeline)
    where = f"v{restored['version']}" if restored else "live results (no CURRENT)"
    context.log.info(f"{config.pipeline} rolled back to {where}")


@dg.job(
    name="promote",
    description="Atomically point reports/<P>/CURRENT at a reprocessed version (run config: pipeline, version).",
)
def promote_job() -> None:
    promote_version()


@dg.job(name="rollback", description="Atomically restore the previous reports/<P>/CURRENT pointer.")
def rollback_job() -> None:
    rollback_version()
