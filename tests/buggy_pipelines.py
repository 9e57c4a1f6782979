"""Test-only pipeline: streaming code that differs from its SQL definition on purpose.

``orders`` v7 claims the v2 definition (``orders.sql`` with the event_id dedup) but its aggregate
counts refunds as purchases: a pipeline-logic bug that the engine-vs-batch check cannot see (both
run this code) and the SQL reference must. Loaded through ``KAPPA_PIPELINE_MODULES=buggy_pipelines``
with ``tests/`` on ``PYTHONPATH``, so Dagster's processes and the processor subprocess register it too.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl

from workers.pipelines import register
from workers.pipelines.base import FrameT
from workers.pipelines.orders import OrdersV2

BUGGY_VERSION = 7


@register
class OrdersRefundsAsPurchases(OrdersV2):
    version: ClassVar[int] = BUGGY_VERSION
    summary: ClassVar[str] = "TEST ONLY: like v2, but refunds are counted as purchases"

    def aggregate(self, rows: FrameT) -> FrameT:
        wrong = pl.when(pl.col("type") == "refund").then(pl.lit("purchase")).otherwise(pl.col("type"))
        return super().aggregate(rows.with_columns(wrong.alias("type")))
