"""What the command modules share."""

from __future__ import annotations

from workers import kafka as kafka_helpers
from workers.config import Settings, load_settings


def kafka_settings() -> Settings:
    """The settings of a command that talks to Kafka, checked first: a wrong address or a stopped
    broker is one clear line at once, not the timeout of whichever call comes first (30 s)."""
    settings = load_settings()
    kafka_helpers.check_reachable(settings)
    return settings
