"""One place that turns the environment into typed settings.

Everything (CLI, workers, Dagster, tests) reads configuration through :func:`load_settings`, so the
same code runs against the local stack and against a real Kafka cluster and AWS S3: only
environment variables change. When a variable is unset, the value written by ``kappa stack up``
into the stack env file is used; real environment variables always win.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workers import keys
from workers.errors import ConfigError, KappaError

#: Kafka client settings passed through to librdkafka: ``KAPPA_KAFKA_SASL_MECHANISM`` -> ``sasl.mechanism``.
KAFKA_PASSTHROUGH_PREFIX = "KAPPA_KAFKA_"
#: librdkafka keys whose values must never be printed.
SECRET_KAFKA_KEYS = frozenset(
    {"sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret"}
)
SECRET_ENV_NAMES = frozenset({"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "KAPPA_KAFKA_SASL_PASSWORD"})

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def cache_dir() -> Path:
    """Where jars are cached: outside the clone so a re-clone is fast (``KAPPA_CACHE_DIR``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kappa-dagster"
    return Path(os.environ.get("KAPPA_CACHE_DIR", default)).expanduser()


def stack_dir() -> Path:
    """Where the local stack keeps data, logs, pids and its env file (``KAPPA_STACK_DIR``)."""
    return Path(os.environ.get("KAPPA_STACK_DIR", cache_dir() / "stack")).expanduser()


def stack_env_file() -> Path:
    return stack_dir() / "stack.env"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (comments and blanks ignored)."""
    if not path.exists():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment over the stack env file's values, changing nothing (for processes that must
    not touch ``os.environ``, e.g. a Dagster code location). ``KAPPA_NO_STACK_ENV=1`` skips the file."""
    env = os.environ if environ is None else environ
    if env.get("KAPPA_NO_STACK_ENV") == "1":
        return dict(env)
    return {**read_env_file(stack_env_file()), **env}


def apply_stack_env(environ: os._Environ[str] | dict[str, str] | None = None) -> None:
    """Fill unset variables from the stack env file, so Dagster's ``EnvVar`` sees them too.

    ``KAPPA_NO_STACK_ENV=1`` disables this (for runs against a real cluster on a machine that also
    has a local stack).
    """
    env = os.environ if environ is None else environ
    for key, value in environment(env).items():
        env.setdefault(key, value)


@dataclass(frozen=True, repr=False)
class Settings:
    bootstrap_servers: str
    kafka_extra: Mapping[str, str] = field(default_factory=dict)
    s3_endpoint_url: str | None = None
    s3_bucket: str = "kappa"
    s3_region: str = "us-east-1"
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    events_topic: str = "events"
    dlq_topic: str = "events.dlq"
    #: records later than grace, byte-exact with their source coordinates (``KAPPA_LATE_TOPIC``)
    late_topic: str = "events.late"
    #: replication factor for topics the project creates; -1 = the broker's default
    topic_replication: int = -1
    #: first part of every consumer group the workers name (``KAPPA_GROUP_PREFIX``, see ``workers.keys``)
    group_prefix: str = keys.DEFAULT_GROUP_PREFIX

    def kafka_config(self, **overrides: object) -> dict[str, object]:
        """librdkafka config: bootstrap + pass-through security settings + per-client overrides."""
        config: dict[str, object] = {"bootstrap.servers": self.bootstrap_servers, **self.kafka_extra}
        config.update(overrides)
        return config

    def __repr__(self) -> str:
        return f"Settings({self.redacted()})"

    def redacted(self) -> dict[str, str]:
        """A printable view: secrets replaced by ``***``."""
        extra = {k: ("***" if k in SECRET_KAFKA_KEYS else v) for k, v in self.kafka_extra.items()}
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "kafka_extra": ", ".join(f"{k}={v}" for k, v in sorted(extra.items())) or "-",
            "s3_endpoint_url": self.s3_endpoint_url or "AWS default",
            "s3_bucket": self.s3_bucket,
            "s3_region": self.s3_region,
            "aws_access_key_id": "***" if self.aws_access_key_id else "(default chain)",
            "events_topic": self.events_topic,
            "dlq_topic": self.dlq_topic,
            "late_topic": self.late_topic,
            "topic_replication": str(self.topic_replication),
            "group_prefix": self.group_prefix,
        }


def kafka_passthrough(env: Mapping[str, str]) -> dict[str, str]:
    """``KAPPA_KAFKA_SECURITY_PROTOCOL=SASL_SSL`` -> ``{"security.protocol": "SASL_SSL"}``."""
    return {
        name[len(KAFKA_PASSTHROUGH_PREFIX) :].lower().replace("_", "."): value
        for name, value in env.items()
        if name.startswith(KAFKA_PASSTHROUGH_PREFIX) and value != ""
    }


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from the environment (falling back to the stack env file) and validate them."""
    if env is None:
        apply_stack_env()
        env = os.environ
    bootstrap = env.get("KAPPA_BOOTSTRAP_SERVERS", "").strip()
    if not bootstrap:
        raise ConfigError(
            "KAPPA_BOOTSTRAP_SERVERS is not set and no local stack is running: "
            "run `kappa stack up` or export KAPPA_BOOTSTRAP_SERVERS=host:port"
        )
    bucket = env.get("KAPPA_S3_BUCKET", "kappa").strip()
    if not BUCKET_RE.match(bucket):
        raise ConfigError(f"KAPPA_S3_BUCKET={bucket!r} is not a valid S3 bucket name (3-63 chars, a-z 0-9 . -)")
    events_topic = env.get("KAPPA_EVENTS_TOPIC", "events")
    dlq_topic = env.get("KAPPA_DLQ_TOPIC", f"{events_topic}.dlq")
    late_topic = env.get("KAPPA_LATE_TOPIC", f"{events_topic}.late")
    topics = (("KAPPA_EVENTS_TOPIC", events_topic), ("KAPPA_DLQ_TOPIC", dlq_topic), ("KAPPA_LATE_TOPIC", late_topic))
    for name, topic in topics:
        if not TOPIC_RE.match(topic):
            raise ConfigError(f"{name}={topic!r} is not a valid Kafka topic name")
    replication = env.get("KAPPA_TOPIC_REPLICATION_FACTOR", "-1").strip()
    if not replication.lstrip("-").isdigit() or int(replication) == 0 or int(replication) < -1:
        raise ConfigError(f"KAPPA_TOPIC_REPLICATION_FACTOR={replication!r} must be a positive integer or -1")
    group_prefix = env.get("KAPPA_GROUP_PREFIX", keys.DEFAULT_GROUP_PREFIX).strip()
    try:
        keys.valid_group_prefix(group_prefix)
    except KappaError as exc:
        raise ConfigError(f"KAPPA_GROUP_PREFIX: {exc}") from None
    return Settings(
        bootstrap_servers=bootstrap,
        kafka_extra=kafka_passthrough(env),
        s3_endpoint_url=env.get("KAPPA_S3_ENDPOINT_URL") or None,
        s3_bucket=bucket,
        s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        events_topic=events_topic,
        dlq_topic=dlq_topic,
        late_topic=late_topic,
        topic_replication=int(replication),
        group_prefix=group_prefix,
    )
