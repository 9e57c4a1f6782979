"""The code location: every module under ``defs/`` loaded together (assets, checks, jobs, sensors, schedules)."""

import warnings

import dagster as dg

from kappa_dagster import defs as defs_package
from kappa_dagster.defs import resources

with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.PreviewWarning)  # the loader is "preview"; its behaviour is what we want
    warnings.simplefilter("ignore", dg.BetaWarning)  # backfill_policy is "beta": a backfill as one run is the point
    discovered = dg.load_definitions_from_package_module(defs_package)

defs = dg.Definitions.merge(discovered, resources.defs)
