"""The code location: everything under ``defs/`` loaded together."""

from __future__ import annotations

import dagster as dg

from kappa_dagster.defs import resources

defs = dg.Definitions.merge(
    resources.defs,
)
