"""Dagster code location for kappa-dagster: models the replay of S3 history through Kafka."""

from kappa_dagster.definitions import defs

__all__ = ["defs"]
