"""Which replay a run is about (pipeline, version, day), from tags and run config, validated up front.

Runs start from the UI, the CLI, backfills, schedules and sensors; one resolver (tag, then config,
then the default; both must agree) means each path picks the same version, and a bad day or version
fails with one line before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from workers import keys
from workers.config import Settings
from workers.errors import KappaError
from workers.pipelines import get_pipeline
from workers.replay import loader as replay_loader
from workers.replay import manifest as replay_manifest

VERSION_TAG = "kappa/version"
PIPELINE_TAG = "kappa/pipeline"
REPLAY_TAG = "kappa/replay"
DEFAULT_VERSION = 2
DEFAULT_PIPELINE = "orders"


@dataclass(frozen=True)
class ReplayTarget:
    pipeline: str
    version: int
    day: str

    def spec(
        self, settings: Settings, partitions: int | None = None, throttle: float | None = None, run: str | None = None
    ) -> replay_loader.ReplaySpec:
        return replay_loader.ReplaySpec(
            pipeline=self.pipeline,
            version=self.version,
            day=self.day,
            source_topic=settings.events_topic,
            bucket=settings.s3_bucket,
            partitions=partitions,
            throttle=throttle,
            run=run,
            group_prefix=settings.group_prefix,
        )

    def slot(self, settings: Settings) -> str:
        """The stable id of this (pipeline, version, day, archive): where its manifest and lease live."""
        bucket, topic = settings.s3_bucket, settings.events_topic
        return replay_manifest.replay_id(self.pipeline, self.version, self.day, bucket, topic)

    @property
    def label(self) -> str:
        return f"the replay of {self.pipeline} v{self.version} for {self.day}"

    @property
    def report_key(self) -> str:
        return keys.report_file(self.pipeline, self.version, self.day)

    @property
    def tags(self) -> dict[str, str]:
        return {VERSION_TAG: str(self.version), PIPELINE_TAG: self.pipeline}


def _pick(what: str, tag: object, configured: object, default: object) -> object:
    if tag is not None and configured is not None and tag != configured:
        raise KappaError(f"{what} given twice and differently: tag says {tag!r}, run config says {configured!r}")
    return tag if tag is not None else configured if configured is not None else default


def parse_version(text: str) -> int:
    try:
        return keys.valid_version(int(str(text).strip().lstrip("v")))
    except ValueError:
        raise KappaError(f"version {text!r} is not a positive integer (e.g. 2)") from None


def resolve(
    tags: dict[str, str], partition_key: str, pipeline: str | None = None, version: int | None = None
) -> ReplayTarget:
    """The validated target of a run; raises KappaError naming what is wrong."""
    day = keys.valid_day(partition_key)
    tag_version = parse_version(tags[VERSION_TAG]) if VERSION_TAG in tags else None
    name = keys.valid_name(str(_pick("pipeline", tags.get(PIPELINE_TAG), pipeline, DEFAULT_PIPELINE)))
    number = parse_version(str(_pick("version", tag_version, version, DEFAULT_VERSION)))
    get_pipeline(name, number)  # unknown pipeline/version -> KappaError listing the known ones
    return ReplayTarget(pipeline=name, version=number, day=day)


def targets_of(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, replay: object
) -> list[ReplayTarget]:
    """Every day of the run, in order: one for ``dagster/partition``, the whole range of a single-run
    backfill (``BackfillPolicy.single_run``); a user error fails the step clearly."""
    tags = dict(context.run.tags)
    # a one-day run names its day in the tag: read it as given, so a day outside the partitions
    # definition gets our one-line error rather than Dagster's invariant check on the key range
    days = [tags["dagster/partition"]] if "dagster/partition" in tags else context.partition_keys
    try:
        return [
            resolve(tags, day, getattr(replay, "pipeline", None), getattr(replay, "version", None))
            for day in days
        ]
    except KappaError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
