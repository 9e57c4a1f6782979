"""The opening every replay step shares: the run's target, settings, S3 client, manifest and lease."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg

from kappa_dagster.defs.resources import KappaResource, ReplayOptions
from kappa_dagster.replay.lease import held
from kappa_dagster.replay.target import ReplayTarget, targets_of
from workers.config import Settings
from workers.errors import KappaError
from workers.replay import lease as replay_lease
from workers.replay import manifest as replay_manifest
from workers.replay.manifest import ReplayManifest


@contextmanager
def user_errors(allow_retries: bool = False) -> Iterator[None]:
    """A KappaError (a user or state error with one clear message) fails the step with that message."""
    try:
        yield
    except KappaError as exc:
        raise dg.Failure(description=str(exc), allow_retries=allow_retries) from None


@dataclass(frozen=True)
class ReplayStep:
    """One step of one replay run: which replays (one day, or every day of a backfill's range), where
    they live, and how to hold their slots."""

    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext
    replay: ReplayOptions
    settings: Settings
    client: Any
    targets: tuple[ReplayTarget, ...]

    @classmethod
    def open(
        cls,
        context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
        kappa: KappaResource,
        replay: ReplayOptions,
    ) -> ReplayStep:
        """Resolve the targets first: a bad day or version fails before anything is read."""
        targets = tuple(targets_of(context, replay))
        settings = kappa.settings()
        return cls(context, replay, settings, kappa.s3_client(settings), targets)

    @property
    def target(self) -> ReplayTarget:
        """The run's day; a step that handles one day only (a range run is :attr:`is_range`)."""
        if self.is_range:
            raise dg.Failure(description="this step handles one day at a time: launch it per partition")
        return self.targets[0]

    @property
    def is_range(self) -> bool:
        return len(self.targets) > 1

    @property
    def days(self) -> list[str]:
        return [target.day for target in self.targets]

    @property
    def bucket(self) -> str:
        return self.settings.s3_bucket

    def lease(self, release: bool) -> AbstractContextManager[replay_lease.Lease | replay_lease.LeaseSet]:
        """Hold every day's slot lease while the step runs (see ``kappa_dagster.replay.lease``)."""
        slots = {target.slot(self.settings): target.label for target in self.targets}
        return held(self.context, self.client, self.bucket, slots, self.replay, release)

    def manifest(self, states: set[str] | None = None, target: ReplayTarget | None = None) -> ReplayManifest:
        """A day's manifest (default: the run's one day), if its replay got at least as far as ``states``
        (default: loaded)."""
        target = target or self.target
        slot = target.slot(self.settings)
        manifest = replay_manifest.read_manifest(self.client, self.bucket, slot)
        wanted = states or replay_manifest.LOADED_STATES
        if manifest is None or manifest.status not in wanted:
            status = manifest.status if manifest else "absent"
            raise dg.Failure(
                description=f"replay {slot} is {status}, not {' or '.join(sorted(wanted))}: "
                f"run the reprocess job for {target.day}",
                allow_retries=False,
            )
        return manifest

    def manifests(self, states: set[str] | None = None) -> dict[str, ReplayManifest]:
        """Every day's manifest, in day order (each as :meth:`manifest`)."""
        return {target.day: self.manifest(states, target) for target in self.targets}


def check_outputs(context: dg.AssetExecutionContext) -> Iterator[dg.Output]:
    """The empty outputs of an asset's selected checks, for a range step that logs its verdicts per day
    as ``AssetCheckEvaluation`` events (an ``AssetCheckResult`` names the step's partition, and a range
    step has none)."""
    for name, spec in context.assets_def.check_specs_by_output_name.items():
        if spec.key in context.selected_asset_check_keys:
            yield dg.Output(None, output_name=name)
