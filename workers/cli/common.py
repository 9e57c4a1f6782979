"""What the command modules share."""

from __future__ import annotations

from collections.abc import Callable

import typer

from workers import kafka as kafka_helpers
from workers import keys
from workers.config import Settings, load_settings
from workers.errors import KappaError


def kafka_settings() -> Settings:
    """The settings of a command that talks to Kafka, checked first: a wrong address or a stopped
    broker is one clear line at once, not the timeout of whichever call comes first (30 s)."""
    return check_kafka(load_settings())


def check_kafka(settings: Settings) -> Settings:
    """The broker check alone, for a command that checks its own arguments first (a mistake in them
    is reported even while the broker is down)."""
    kafka_helpers.check_reachable(settings)
    return settings


def topic_name(param: typer.CallbackParam, value: str | None) -> str | None:
    """Option callback: a topic given on the command line is checked as given, before anything
    connects (``--topic ""`` is a mistake, not a request for the default)."""
    return None if value is None else _named(param, keys.valid_topic, value)


def group_name(param: typer.CallbackParam, value: str | None) -> str | None:
    """Option callback: a consumer group given on the command line is checked as given (see :func:`topic_name`)."""
    return None if value is None else _named(param, keys.valid_group, value)


def _named(param: typer.CallbackParam, check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except KappaError as exc:
        raise KappaError(f"{param.opts[0]}: {exc}") from None
