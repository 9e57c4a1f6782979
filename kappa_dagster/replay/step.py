"""The opening every replay step shares: the run's target, settings, S3 client, manifest and lease."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg

from kappa_dagster.defs.resources import KappaResource, ReplayOptions
from kappa_dagster.replay.lease import held
from kappa_dagster.replay.target import ReplayTarget, target_of
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
    """One step of one replay run: which replay, where it lives, and how to hold its slot."""

    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext
    replay: ReplayOptions
    settings: Settings
    client: Any
    target: ReplayTarget

    @classmethod
    def open(
        cls,
        context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
        kappa: KappaResource,
        replay: ReplayOptions,
    ) -> ReplayStep:
        """Resolve the target first: a bad day or version fails before anything is read."""
        target = target_of(context, replay)
        settings = kappa.settings()
        return cls(context, replay, settings, kappa.s3_client(settings), target)

    @property
    def bucket(self) -> str:
        return self.settings.s3_bucket

    @property
    def slot(self) -> str:
        return self.target.slot(self.settings)

    def lease(self, release: bool) -> AbstractContextManager[replay_lease.Lease]:
        """Hold the slot's lease while the step runs (see ``kappa_dagster.replay.lease``)."""
        return held(self.context, self.client, self.bucket, self.slot, self.target.label, self.replay, release)

    def manifest(self, states: set[str] | None = None) -> ReplayManifest:
        """The slot's manifest, if its replay got at least as far as ``states`` (default: loaded)."""
        manifest = replay_manifest.read_manifest(self.client, self.bucket, self.slot)
        wanted = states or replay_manifest.LOADED_STATES
        if manifest is None or manifest.status not in wanted:
            status = manifest.status if manifest else "absent"
            raise dg.Failure(
                description=f"replay {self.slot} is {status}, not {' or '.join(sorted(wanted))}: "
                f"run the reprocess job for {self.target.day}",
                allow_retries=False,
            )
        return manifest
