"""One replay per (pipeline, version, day) at a time: a lease object in S3, created with ``If-None-Match: *``.

Replays start from Dagster, schedules, backfills, the CLI and tests, and only some go through the run
queue, so the lease lives next to the manifest. It keeps honest runs apart; zombies are stopped by
the manifest's own conditional writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from workers import keys
from workers import s3 as s3_helpers
from workers.errors import KappaError

log = logging.getLogger("kappa.replay_lease")

DEFAULT_TTL_S = 120.0


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def local_process_gone(owner: str) -> bool:
    """True for a ``host:pid`` owner on this host whose process no longer exists (a killed CLI run)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


class LeaseBusy(KappaError):
    """Another run holds the lease of this replay slot."""


@dataclass
class Lease:
    client: Any
    bucket: str
    slot: str
    owner: str
    ttl_s: float
    etag: str
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> str:
        return keys.replay_lease(self.slot)

    def renew(self) -> None:
        """Push the expiry forward; raises Conflict (and sets ``lost``) when another run took the lease."""
        try:
            body = _body(self.slot, self.owner, self.ttl_s)
            self.etag = s3_helpers.put_if(self.client, self.bucket, self.key, body, self.etag)
        except s3_helpers.Fenced:
            self.lost.set()
            raise

    def release(self) -> None:
        """Delete the lease if it is still ours (a takeover already replaced it otherwise)."""
        s3_helpers.delete_if(self.client, self.bucket, self.key, self.etag)

    def kept_alive(self, interval_s: float | None = None) -> contextlib.AbstractContextManager[Lease]:
        """Renew every ``ttl/3`` from a daemon thread while the body runs (a long load or consume)."""
        return _renewed(self, [self], interval_s or self.ttl_s / 3)


@dataclass
class LeaseSet:
    """The leases of every day of a many-day replay, held and renewed together; ``lost`` when any is lost."""

    leases: list[Lease]
    lost: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        for lease in self.leases:
            try:
                lease.release()
            except Exception as exc:  # the others still go; an unreleased one expires with its ttl
                log.warning("could not release the lease of %s: %s", lease.slot, exc)

    def kept_alive(self, interval_s: float | None = None) -> contextlib.AbstractContextManager[LeaseSet]:
        """One thread renews every lease each ``ttl/3`` (a year's range holds 365 of them)."""
        ttl = min((lease.ttl_s for lease in self.leases), default=DEFAULT_TTL_S)
        return _renewed(self, self.leases, interval_s or ttl / 3)


@contextlib.contextmanager
def _renewed(holder: Any, leases: list[Lease], every: float) -> Iterator[Any]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            for lease in leases:
                try:
                    lease.renew()
                except s3_helpers.Fenced:
                    log.error("lease of replay %s lost to another run; this run's writes will be refused", lease.slot)
                    return
                except Exception as exc:  # S3 hiccup: try again next round, the ttl covers a few misses
                    log.warning("lease renewal of %s failed: %s", lease.slot, exc)

    thread = threading.Thread(target=loop, name=f"lease-{leases[0].slot if leases else 'none'}", daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join(timeout=5)


def _body(slot: str, owner: str, ttl_s: float) -> bytes:
    now = time.time()
    expires = now + ttl_s
    doc = {"slot": slot, "owner": owner, "renewed_at": _iso(now), "expires_at": _iso(expires), "expires": expires}
    return json.dumps(doc, sort_keys=True).encode()


def acquire(
    client: Any,
    bucket: str,
    slot: str,
    owner: str,
    *,
    what: str,
    ttl_s: float = DEFAULT_TTL_S,
    wait_s: float = 0.0,
    poll_s: float = 1.0,
    owner_gone: Callable[[str], bool] | None = None,
) -> Lease:
    """Take the slot's lease (re-entrant for the same owner); wait up to ``wait_s``, then raise LeaseBusy."""
    key = keys.replay_lease(slot)
    deadline = time.monotonic() + wait_s
    while True:
        current = s3_helpers.get_stored(client, bucket, key)
        holder: dict[str, Any] = json.loads(current.body) if current else {}
        etag = current.etag if current else None
        free = (
            current is None
            or holder.get("owner") == owner
            or float(holder.get("expires", 0)) < time.time()
            or local_process_gone(str(holder.get("owner")))
            or (owner_gone is not None and owner_gone(str(holder.get("owner"))))
        )
        if free:
            try:
                new_etag = s3_helpers.put_if(client, bucket, key, _body(slot, owner, ttl_s), etag)
            except s3_helpers.Fenced:
                continue  # another run raced us to it: look again
            if current is not None and holder.get("owner") != owner:
                log.warning("took over the lease of replay %s from %s", slot, holder.get("owner"))
            return Lease(client, bucket, slot, owner, ttl_s, new_etag)
        if time.monotonic() >= deadline:
            raise LeaseBusy(
                f"{what} is already running in {holder.get('owner')} (lease until {holder.get('expires_at')}): "
                "wait for that run to finish, or cancel it; a lease whose owner died expires by itself"
            )
        time.sleep(poll_s)


def acquire_all(
    client: Any,
    bucket: str,
    slots: dict[str, str],
    owner: str,
    **options: Any,
) -> LeaseSet:
    """Take the lease of every slot (slot -> what, for the message) or none: a range holds all its days.

    Slots are taken in sorted order, so two overlapping ranges never each hold a part and wait for the other.
    """
    taken = LeaseSet([])
    try:
        for slot in sorted(slots):
            lease = acquire(client, bucket, slot, owner, what=slots[slot], **options)
            lease.lost = taken.lost
            taken.leases.append(lease)
    except BaseException:
        taken.release()
        raise
    return taken
