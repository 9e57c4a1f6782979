"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations


class KappaError(Exception):
    """A mistake the user can fix (bad config, bad argument, unreachable service)."""


class ConfigError(KappaError):
    """Configuration is missing or invalid."""


class StackError(KappaError):
    """The local Kafka/S3 stack could not be fetched, started or reached."""


class UnreachableError(KappaError):
    """A broker or S3 endpoint did not answer within the timeout."""
