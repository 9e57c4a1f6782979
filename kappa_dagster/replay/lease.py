"""A run holds its replay slot's lease (``workers.replay.lease``) while it loads, consumes and checks.

The owner is the Dagster run id, so a lease left by a run that failed or was cancelled is taken over
at once (its run is finished) instead of waiting for the expiry. Steps of one run share it
(re-entrant); the last step (``corrected_report``) releases it, and any step that fails releases it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

from workers.errors import KappaError
from workers.replay import lease as replay_lease

OWNER_PREFIX = "dagster-run:"
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def owner_of(context: dg.AssetExecutionContext) -> str:
    return f"{OWNER_PREFIX}{context.run_id}"


def _owner_gone(instance: dg.DagsterInstance, owner: str) -> bool:
    """True when the owner is a run of this instance that has finished (it cannot be working any more)."""
    if not owner.startswith(OWNER_PREFIX):
        return False
    run = instance.get_run_by_id(owner.removeprefix(OWNER_PREFIX))
    return run is not None and run.status in FINISHED


@contextmanager
def held(
    context: dg.AssetExecutionContext, client: Any, bucket: str, slots: dict[str, str], replay: Any, release: bool
) -> Iterator[replay_lease.Lease | replay_lease.LeaseSet]:
    """Take (or keep) the leases of the step's slots (slot -> what), renewed while it runs; released on
    failure or ``release``. A range's run holds every day's lease, or waits/fails naming the busy day."""
    options: dict[str, Any] = {
        "ttl_s": float(getattr(replay, "lease_ttl_seconds", replay_lease.DEFAULT_TTL_S)),
        "wait_s": float(getattr(replay, "lease_wait_seconds", 0.0)),
        "owner_gone": lambda owner: _owner_gone(context.instance, owner),
    }
    try:
        if len(slots) == 1:
            ((slot, what),) = slots.items()
            lease: replay_lease.Lease | replay_lease.LeaseSet = replay_lease.acquire(
                client, bucket, slot, owner_of(context), what=what, **options
            )
        else:
            lease = replay_lease.acquire_all(client, bucket, slots, owner_of(context), **options)
    except KappaError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    failed = True
    try:
        with lease.kept_alive():
            yield lease
        failed = False
    finally:
        if failed or release:
            lease.release()
