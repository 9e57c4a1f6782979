"""Consumer-group membership of the workers: static identity, group protocol, one config builder.

Static membership lets a worker restarted after ``kill -9`` take its partitions back in seconds
instead of a session timeout; why and what it costs: docs/ARCHITECTURE.md, "Group membership".
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from workers.config import Settings, cache_dir
from workers.errors import KappaError

GroupProtocol = Literal["classic", "consumer"]
PROTOCOLS: tuple[GroupProtocol, ...] = ("classic", "consumer")
DEFAULT_PROTOCOL: GroupProtocol = "classic"
#: client settings the consumer protocol (KIP-848) moves to the broker; librdkafka rejects them
CLASSIC_ONLY = ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy")
INSTANCE_ENV, PROTOCOL_ENV = "KAPPA_INSTANCE_ID", "KAPPA_GROUP_PROTOCOL"
AUTO, NONE = "auto", "none"
#: Dynamic by default: a static member can be fenced by its own re-join after a broker restart
#: (librdkafka#3437), which the broker-restart suite hit; ``auto`` opts into fast takeover.
DEFAULT_INSTANCE = NONE
INSTANCE_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
MAX_ORDINALS = 256


@dataclass
class Membership:
    """How one worker joins its group; holds the ordinal lock while the worker runs."""

    protocol: GroupProtocol = DEFAULT_PROTOCOL
    instance_id: str | None = None
    _lock: IO[bytes] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Free the ordinal slot (also freed by the kernel when the process dies)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def validate(instance: str | None = None, protocol: str | None = None) -> tuple[GroupProtocol, str]:
    """Flag > environment > default for both settings; a bad value is one clear error. Returns the
    protocol and the wanted identity (``auto``, ``none`` or an explicit id)."""
    chosen = flag_env_default(protocol, PROTOCOL_ENV, DEFAULT_PROTOCOL).strip().lower()
    if chosen not in PROTOCOLS:
        raise KappaError(f"--group-protocol / {PROTOCOL_ENV} must be one of {', '.join(PROTOCOLS)}, got {chosen!r}")
    wanted = flag_env_default(instance, INSTANCE_ENV, DEFAULT_INSTANCE).strip()
    if wanted.lower() not in (AUTO, NONE) and not INSTANCE_RE.match(wanted):
        raise KappaError(f"--instance-id / {INSTANCE_ENV} {wanted!r} may only use letters, digits, '.', '_', '-'")
    return chosen, wanted  # type: ignore[return-value]


def flag_env_default(flag: str | None, variable: str, default: str) -> str:
    """The flag as given, even empty (a mistake, not a request for the default); else the environment
    variable, where empty means unset; else the default."""
    return (os.environ.get(variable) or default) if flag is None else flag


def resolve(role: str, group: str, instance: str | None = None, protocol: str | None = None) -> Membership:
    """The membership of one worker; the default identity claims this host's lowest free ordinal."""
    chosen, wanted = validate(instance, protocol)
    if wanted.lower() == NONE:
        return Membership(chosen)
    if wanted.lower() != AUTO:
        return Membership(chosen, wanted)
    ordinal, lock = claim_ordinal(role, group)
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:100] or "host"
    return Membership(chosen, f"kappa-{role}-{host}-{ordinal}", lock)


def lock_dir() -> Path:
    """Where ordinal locks live: ``KAPPA_INSTANCE_LOCK_DIR``, else under the cache dir, else (a
    read-only home, e.g. in a container) the temp dir: every worker of the host sees the same one."""
    if "KAPPA_INSTANCE_LOCK_DIR" in os.environ:
        return Path(os.environ["KAPPA_INSTANCE_LOCK_DIR"]).expanduser()
    for folder in (cache_dir() / "instances", Path(tempfile.gettempdir()) / "kappa-instances"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError:
            continue
    return folder


def claim_ordinal(role: str, group: str) -> tuple[int, IO[bytes]]:
    """The lowest ordinal whose lock file nobody holds, with its (held) lock."""
    folder = lock_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KappaError(f"cannot create {folder} for instance locks ({exc.strerror}); "
                         f"set {INSTANCE_ENV} or KAPPA_INSTANCE_LOCK_DIR") from None
    safe_group = re.sub(r"[^A-Za-z0-9._-]", "_", group)
    for ordinal in range(MAX_ORDINALS):
        handle = (folder / f"{safe_group}.{role}.{ordinal}.lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return ordinal, handle
    raise KappaError(f"more than {MAX_ORDINALS} {role} workers of group {group} on this host; set {INSTANCE_ENV}")


def consumer_config(
    settings: Settings,
    membership: Membership,
    *,
    group: str,
    session_timeout_ms: int,
    assignment_strategy: str = "cooperative-sticky",
    **overrides: object,
) -> dict[str, object]:
    """The group consumer settings of every worker: membership, protocol and liveness in one place."""
    config: dict[str, object] = {
        "group.id": group,
        "group.protocol": membership.protocol,
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(1000, min(3000, session_timeout_ms // 6)),
        "partition.assignment.strategy": assignment_strategy,
        **overrides,
    }
    if membership.instance_id is not None:
        config["group.instance.id"] = membership.instance_id
    config = settings.kafka_config(**config)
    if membership.protocol == "consumer":  # also drops pass-through KAPPA_KAFKA_SESSION_TIMEOUT_MS & co
        for key in CLASSIC_ONLY:
            config.pop(key, None)
    return config


@dataclass
class RejoinBudget:
    """At most ``limit`` rejoins within a sliding ``window_s``: past that, the cause is not a passing one."""

    limit: int = 3
    window_s: float = 300.0
    times: list[float] = field(default_factory=list)

    def take(self, now: float) -> bool:
        """True (and counted) when there is room for one more rejoin at ``now``."""
        self.times = [t for t in self.times if now - t < self.window_s]
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


@dataclass
class SelfFenceBudget(RejoinBudget):
    """When the broker fences our own static member, rejoin with a new consumer, a few times at most.

    librdkafka reports "Static consumer fenced by other consumer with same group.instance.id" as a
    fatal error also when the "other consumer" is this very process: after a coordinator restart or
    an expired session, its own re-join registered a new member id and the old one is fenced
    (librdkafka#3437). The cure is a new consumer with the same id. A real duplicate id (two
    processes given one ``--instance-id``) fences back and forth instead, so after ``limit`` rejoins
    within ``window_s`` the error stays fatal and the worker exits with it.
    """

    def allows(self, error: object, now: float, *, static: bool = False) -> bool:
        """True (and counted) when ``error`` is our static member fenced and the budget has room.

        After the fatal error, every consumer call fails with a bare ``_FATAL`` ("Local: Fatal
        error") that no longer names the cause; for a ``static`` member the fence is the only fatal
        error a consumer has, so a bare one counts too, whichever call met it first.
        """
        return is_fenced_instance(error, static=static) and self.take(now)


@dataclass
class UnansweredBudget(RejoinBudget):
    """When a group call still times out after its retries, rejoin with new clients, a few times at most.

    After a broker restart librdkafka's connection to a coordinator can stay stuck: its requests sit
    in the out-queue and time out again and again ("GroupCoordinator: Timed out 0 in-flight, 0
    retry-queued, 1 out-queue"), as the transactional producer's does (librdkafka#5511). Retrying
    on the same client never ends; a new client connects afresh. A broker that is really gone fails
    the new clients too, so after ``limit`` rejoins within ``window_s`` the error propagates.
    """

    limit: int = 5
    window_s: float = 600.0

    def allows(self, error: object, now: float) -> bool:
        """True (and counted) when ``error`` is a transient Kafka error and the budget has room."""
        from confluent_kafka import KafkaError

        from workers import kafka as kafka_helpers

        return isinstance(error, KafkaError) and kafka_helpers.is_transient(error) and self.take(now)


def rejoin_cause(error: object) -> str:
    """How a rejoin log line names its cause (the reliability suite counts both kinds)."""
    return "fenced this member" if is_fenced_instance(error, static=True) else "did not answer in time"


def is_fenced_instance(error: object, *, static: bool = False) -> bool:
    """librdkafka's report of a fenced static member: FENCED_INSTANCE_ID, or the fatal error it raises
    for it (from ``consume()`` as ``_FATAL`` naming group.instance.id, a bare ``_FATAL`` from other calls)."""
    from confluent_kafka import KafkaError

    if not isinstance(error, KafkaError):
        return False
    if error.code() == KafkaError.FENCED_INSTANCE_ID:
        return True
    return error.code() == KafkaError._FATAL and (static or "group.instance.id" in error.str())
