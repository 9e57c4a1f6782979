"""Every S3 key the project reads or writes, built only from validated parts.

One module keeps the layout contracts (docs/ARCHITECTURE.md, "Contracts") in one place and makes
path traversal impossible: days are real dates, names match strict patterns, numbers are integers.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from workers.errors import KappaError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
REPLAY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RAW_FILE_RE = re.compile(
    r"^raw/(?P<topic>[A-Za-z0-9._-]+)/dt=(?P<day>\d{4}-\d{2}-\d{2})/part=(?P<partition>\d+)/"
    r"(?P<first>\d{20})-(?P<last>\d{20})\.parquet$"
)


def valid_day(day: str) -> str:
    """``2026-11-20`` -> itself; anything else (``../``, ``2026-13-45``) raises a clear error."""
    if not isinstance(day, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
        raise KappaError(f"day {day!r} is not a date in YYYY-MM-DD form")
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        raise KappaError(f"day {day!r} is not a real calendar date") from None
    return day


def valid_name(name: str, what: str = "pipeline") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise KappaError(f"{what} name {name!r} must match {NAME_RE.pattern}")
    return name


def valid_topic(topic: str) -> str:
    if not isinstance(topic, str) or not TOPIC_RE.match(topic) or topic in {".", ".."}:
        raise KappaError(f"topic {topic!r} is not a valid Kafka topic name")
    return topic


def valid_version(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or not 0 < version < 10_000:
        raise KappaError(f"version {version!r} must be a positive integer")
    return version


def valid_replay_id(replay_id: str) -> str:
    if not isinstance(replay_id, str) or not REPLAY_ID_RE.match(replay_id):
        raise KappaError(f"replay id {replay_id!r} must match {REPLAY_ID_RE.pattern}")
    return replay_id


# ---------------------------------------------------------------- raw archive


def raw_topic_prefix(topic: str) -> str:
    return f"raw/{valid_topic(topic)}/"


def raw_day_prefix(topic: str, day: str) -> str:
    return f"{raw_topic_prefix(topic)}dt={valid_day(day)}/"


def raw_file(topic: str, day: str, partition: int, first_offset: int, last_offset: int) -> str:
    if partition < 0 or first_offset < 0 or last_offset < first_offset:
        raise KappaError(f"bad offset range {first_offset}-{last_offset} for partition {partition}")
    return f"{raw_day_prefix(topic, day)}part={partition}/{first_offset:020d}-{last_offset:020d}.parquet"


def parse_raw_file(key: str) -> dict[str, str | int] | None:
    """The parts of a raw archive object key, or None if the key is not one."""
    match = RAW_FILE_RE.match(key)
    if match is None:
        return None
    parts = match.groupdict()
    return {
        "topic": parts["topic"],
        "day": parts["day"],
        "partition": int(parts["partition"]),
        "first_offset": int(parts["first"]),
        "last_offset": int(parts["last"]),
    }


#: Kafka timestamps (epoch ms) that have a ``YYYY-MM-DD`` UTC day: 0001-01-01 .. 9999-12-31. Brokers
#: accept any 64-bit timestamp (older ones, or a topic with ``message.timestamp.after.max.ms`` raised),
#: so records outside this range have no ``dt=`` prefix: the archiver quarantines them, the
#: processor dead-letters them.
MIN_DAY_MS = -62_135_596_800_000
MAX_DAY_MS = 253_402_300_799_999


def quarantine_file(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    """Records whose timestamp has no calendar day, byte-exact, same Parquet schema as ``raw/``:
    ``quarantine/<topic>/part=<p>/<first:020d>-<last:020d>.parquet`` (outside ``raw/``, whose
    readers expect ``dt=`` prefixes)."""
    if partition < 0 or first_offset < 0 or last_offset < first_offset:
        raise KappaError(f"bad offset range {first_offset}-{last_offset} for partition {partition}")
    return f"quarantine/{valid_topic(topic)}/part={partition}/{first_offset:020d}-{last_offset:020d}.parquet"


def archiver_checkpoint(topic: str, partition: int) -> str:
    """The archiver's durable resume point for one partition."""
    return f"_state/archiver/{valid_topic(topic)}/part={int(partition)}.json"


# ---------------------------------------------------------------- reports


def report_file(pipeline: str, version: int, day: str) -> str:
    """The corrected report: ``reports/<P>/v<V>/dt=<D>/report.parquet``."""
    return f"reports/{valid_name(pipeline)}/v{valid_version(version)}/dt={valid_day(day)}/report.parquet"


def diff_file(pipeline: str, version: int, day: str) -> str:
    """The version diff against what users read: ``reports/<P>/v<V>/dt=<D>/diff.parquet``."""
    return report_file(pipeline, version, day).removesuffix("report.parquet") + "diff.parquet"


def current_pointer(pipeline: str) -> str:
    """``reports/<P>/CURRENT``: which version users and the dashboard read."""
    return f"reports/{valid_name(pipeline)}/CURRENT"


def live_prefix(pipeline: str, version: int) -> str:
    return f"live/{valid_name(pipeline)}/v{valid_version(version)}/"


def replay_manifest(replay_id: str) -> str:
    return f"_state/replays/{valid_replay_id(replay_id)}/manifest.json"


def replay_lease(slot: str) -> str:
    """The create-only lease that lets one run at a time replay a (pipeline, version, day) slot."""
    return f"_state/replays/{valid_replay_id(slot)}/lease.json"


# ---------------------------------------------------------------- processor (workers/processor/engine.py)

GROUP_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def valid_group(group: str) -> str:
    if not isinstance(group, str) or not GROUP_RE.match(group) or group in {".", ".."}:
        raise KappaError(f"consumer group {group!r} must match {GROUP_RE.pattern}")
    return group


# ---------------------------------------------------------------- Kafka topics and consumer groups

#: Every consumer group the workers name starts with this (``KAPPA_GROUP_PREFIX``): two deployments
#: on one cluster keep apart, and Kafka ACLs can grant a deployment its groups by prefix.
DEFAULT_GROUP_PREFIX = "kappa"
#: a group that never joins: only used to read committed offsets and watermarks
OFFSETS_PROBE_GROUP = "kappa.offsets-probe"


def valid_group_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not GROUP_RE.match(prefix) or len(prefix) > 100 or prefix in {".", ".."}:
        raise KappaError(f"group prefix {prefix!r} must be 1-100 characters of A-Z a-z 0-9 . _ -")
    return prefix


def archiver_group(prefix: str) -> str:
    """The archiver's group: ``<prefix>.archiver`` (``kappa archiver --group`` overrides it)."""
    return f"{valid_group_prefix(prefix)}.archiver"


def live_group(pipeline: str, version: int, *, prefix: str) -> str:
    """The live processor of one pipeline version: ``<prefix>.<P>.v<V>.live``."""
    return f"{valid_group_prefix(prefix)}.{valid_name(pipeline)}.v{valid_version(version)}.live"


def replay_group(pipeline: str, version: int, replay_id: str, *, prefix: str) -> str:
    """The bounded processor of one replay: ``<prefix>.<P>.v<V>.replay.<id>``."""
    return (f"{valid_group_prefix(prefix)}.{valid_name(pipeline)}.v{valid_version(version)}"
            f".replay.{valid_replay_id(replay_id)}")


def replay_topic(source_topic: str, replay_id: str) -> str:
    """The replay's own copy of the archived day: ``<source>.replay.<id>``."""
    return valid_topic(f"{source_topic}.replay.{valid_replay_id(replay_id)}")


def dlq_topic(topic: str) -> str:
    """Where the rejects of ``topic`` go: ``<topic>.dlq`` (a replay's own DLQ)."""
    return valid_topic(f"{topic}.dlq")


def late_topic(topic: str) -> str:
    """Where the records of ``topic`` later than grace go: ``<topic>.late`` (a replay's own late topic)."""
    return valid_topic(f"{topic}.late")


def repartition_topic(group: str, state_key: Sequence[str]) -> str:
    """``<group>-<state key>-repartition``, as Kafka Streams names ``<application.id>-<name>-repartition``."""
    return valid_topic(f"{valid_group(group)}-{'-'.join(state_key)}-repartition")


def is_repartition_topic(topic: str, group: str) -> bool:
    """Whether ``topic`` is one of the repartition topics :func:`repartition_topic` names for ``group``."""
    return topic.startswith(f"{group}-") and topic.endswith("-repartition")


def shuffle_group(group: str) -> str:
    """Stage 2 of a shuffled processor group ``G``: ``G-shuffle``."""
    return valid_group(f"{valid_group(group)}-shuffle")


def report_stats_file(pipeline: str, version: int, day: str) -> str:
    """Counters next to the report: ``reports/<P>/v<V>/dt=<D>/stats.json``."""
    return report_file(pipeline, version, day).removesuffix("report.parquet") + "stats.json"


def processor_prefix(pipeline: str, version: int, group: str | None) -> str:
    """Where a processor keeps state and outputs: ``live/<P>/v<V>/`` live, else per bounded group."""
    if group is None:
        return live_prefix(pipeline, version)
    return f"_state/processor/{valid_name(pipeline)}/v{valid_version(version)}/{valid_group(group)}/"


def processor_state(prefix: str, partition: int) -> str:
    """The per-partition commit point: one JSON object, replaced by one PUT."""
    return f"{prefix}_state/part={int(partition)}.json"


def processor_snapshot(prefix: str, partition: int, seq: int, writer: str, kind: str) -> str:
    """Open-window partials (``kind=open``) or dedup keys (``kind=seen``) of one checkpoint."""
    return f"{prefix}_state/part={int(partition)}/{int(seq):012d}-{valid_replay_id(writer)}-{valid_name(kind)}.parquet"


def processor_output(prefix: str, day: str, partition: int, seq: int, writer: str) -> str:
    """Closed-window partials of one partition and day, as of checkpoint ``seq``."""
    return f"{prefix}dt={valid_day(day)}/part={int(partition)}/{int(seq):012d}-{valid_replay_id(writer)}.parquet"
