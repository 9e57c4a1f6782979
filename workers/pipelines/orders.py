"""The reference pipeline ``orders``: events and amount per (1-minute window, type).

v1 counts every valid record; v2 drops repeated ``event_id``s in a window, whatever partition carried them.
Parsing is strict and amounts are summed as exact decimals so the report never depends on arrival
order (the rules: docs/ARCHITECTURE.md, "The orders pipeline").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import attrgetter
from typing import ClassVar, Literal

import msgspec
import polars as pl

from workers.pipelines.base import OUTCOME, REJECT, FrameT, Pipeline

EVENT_TYPES = ("page_view", "add_to_cart", "purchase", "refund")
MAX_ABS_AMOUNT = 1e15
#: batch slices tried on the fast path again when a batch holds a bad value
SLOW_CHUNK = 256
AMOUNT_DECIMAL = pl.Decimal(38, 6)


class Order(msgspec.Struct, gc=False):
    event_id: str
    user_id: str
    type: Literal["page_view", "add_to_cart", "purchase", "refund"]
    amount: float


DECODER = msgspec.json.Decoder(Order)
FIELDS = pl.Schema({"event_id": pl.String, "user_id": pl.String, "type": pl.String, "amount": pl.Float64})


def decode_batch(values: Sequence[bytes | None]) -> list[Order] | None:
    """All values decoded, or None when any value needs a closer look.

    Each value is decoded on its own: one JSON document per record. (A stream decoder such as
    ``decode_lines`` splits on whitespace, not on values, so a value holding two documents next to a
    blank one, or a document split across two values, would pass as two good records.)"""
    if not values:
        return None
    try:
        # JSON is UTF-8, and msgspec does not check the bytes it skips (unknown keys and fields). All
        # ASCII is the common case (0.05 us a record; the UTF-8 check costs 0.2 us). The ASCII
        # separator keeps a multi-byte sequence split across two values from passing the check.
        if not all(map(bytes.isascii, values)):  # type: ignore[arg-type]
            b"\n".join(values).decode("utf-8")  # type: ignore[arg-type]
        return list(map(DECODER.decode, values))  # type: ignore[arg-type]
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, TypeError):  # TypeError: a null value
        return None


def decode_one(value: bytes | None) -> Order | str:
    """One value -> an Order, or the reason it is malformed."""
    if value is None:
        return "null value (tombstone)"
    if not value.strip():
        return "empty value"
    try:
        value.decode("utf-8")
        order = DECODER.decode(value)
    except msgspec.ValidationError as exc:
        return f"schema: {exc}"
    except UnicodeDecodeError:
        return "invalid UTF-8"
    except msgspec.DecodeError as exc:
        return f"not JSON: {exc}"
    except RecursionError:
        return "not JSON: nested too deeply"
    if not math.isfinite(order.amount) or abs(order.amount) >= MAX_ABS_AMOUNT:
        return f"schema: amount {order.amount!r} out of range (|amount| < {MAX_ABS_AMOUNT:g})"
    return order


def frame_schema(fields: Sequence[str]) -> pl.Schema:
    """The parsed frame's schema: ``fields`` typed as in :data:`FIELDS`, then the reject column."""
    return pl.Schema({**{name: FIELDS[name] for name in fields}, REJECT: pl.String})


def orders_frame(orders: Sequence[Order | None], reasons: Sequence[str | None],
                 fields: Sequence[str] = FIELDS.names()) -> pl.DataFrame:
    """Typed columns of ``fields`` (null where rejected) + the reject column."""
    columns = {name: [getattr(o, name) if o is not None else None for o in orders] for name in fields}
    return pl.DataFrame({**columns, REJECT: reasons}, schema=frame_schema(fields))


def valid_frame(orders: Sequence[Order], fields: Sequence[str] = FIELDS.names()) -> pl.DataFrame:
    """The fast path's columns: plain attribute reads, no per-value branching."""
    return pl.DataFrame(
        {
            **{name: list(map(attrgetter(name), orders)) for name in fields},
            REJECT: pl.repeat(None, len(orders), dtype=pl.String, eager=True),
        },
        schema=frame_schema(fields),
    )


def parse_orders(values: Sequence[bytes | None], fields: Sequence[str] = FIELDS.names()) -> pl.DataFrame:
    """The whole batch on the fast path (:func:`decode_batch`); a batch with a bad value is split into
    chunks so only the chunks holding bad values get their reasons value by value (one bad record
    must not slow the batch down).

    Every field is validated; only ``fields`` (``amount`` among them: its range is checked on the
    column) become columns: a string column costs ~0.07 us a record."""
    orders = decode_batch(values)
    if orders is not None:
        frame = valid_frame(orders, fields)
        if frame["amount"].abs().max() < MAX_ABS_AMOUNT:  # type: ignore[operator]
            return frame
    if len(values) > SLOW_CHUNK:
        chunks = [parse_orders(values[i : i + SLOW_CHUNK], fields) for i in range(0, len(values), SLOW_CHUNK)]
        return pl.concat(chunks)
    results = [decode_one(v) for v in values]
    return orders_frame(
        [r if isinstance(r, Order) else None for r in results],
        [r if isinstance(r, str) else None for r in results],
        fields,
    )


class OrdersV1(Pipeline):
    name: ClassVar[str] = "orders"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "events and amount per (1-minute window, type); counts every valid record"
    group_by: ClassVar[tuple[str, ...]] = ("type",)
    reference_sql: ClassVar[str | None] = "orders.sql"
    reference_params: ClassVar[dict[str, bool | int | str]] = {"dedup_event_id": False}
    partial_schema: ClassVar[pl.Schema] = pl.Schema(
        {"window_start": pl.Datetime("ms", "UTC"), "type": pl.String, "events": pl.Int64, "amount": AMOUNT_DECIMAL}
    )
    output_schema: ClassVar[pl.Schema] = pl.Schema(
        {"window_start": pl.Datetime("ms", "UTC"), "type": pl.String, "events": pl.Int64, "amount": pl.Float64}
    )

    def parse(self, values: Sequence[bytes | None]) -> pl.DataFrame:
        """Every field validated; columns only for those the rules read (v1 never reads an id)."""
        read = {*self.group_by, *self.dedup_by, *self.state_key, "amount"}
        return parse_orders(values, [name for name in FIELDS.names() if name in read])

    def aggregate(self, rows: FrameT) -> FrameT:
        return (
            rows.group_by(self.key_columns)
            .agg(pl.len().cast(pl.Int64).alias("events"), pl.col("amount").cast(AMOUNT_DECIMAL).sum())
            .select(self.partial_schema.names())
            .cast(self.partial_schema)  # type: ignore[arg-type]
        )

    def merge(self, partials: FrameT) -> FrameT:
        return (
            partials.group_by(self.key_columns)
            .agg(pl.col("events").sum(), pl.col("amount").sum())
            .select(self.partial_schema.names())
            .cast(self.partial_schema)  # type: ignore[arg-type]
        )

    def diff_rules(self, archive: pl.DataFrame, grace_ms: int | None,
                   observed_late: pl.DataFrame | None = None) -> pl.DataFrame:
        """A record adds one event and its amount (as the exact decimal the report sums) to its window and type."""
        rows = self.classify_archive(archive, grace_ms, observed_late)
        return rows.select(
            "partition",
            "offset",
            OUTCOME,
            *self.key_columns,
            pl.lit(1, dtype=pl.Int64).alias("events"),
            pl.col("amount").cast(AMOUNT_DECIMAL),
        )

    def finalize(self, partials: pl.DataFrame) -> pl.DataFrame:
        merged = self.merge(partials).with_columns(pl.col("amount").cast(pl.Float64))
        return merged.select(self.output_schema.names()).sort(self.key_columns)


class OrdersV2(OrdersV1):
    version: ClassVar[int] = 2
    summary: ClassVar[str] = "like v1, but a repeated event_id in the same window counts once (any partition)"
    dedup_by: ClassVar[tuple[str, ...]] = ("event_id",)
    #: copies of an event_id arrive through any partition: dedup state goes through the shuffle
    state_key: ClassVar[tuple[str, ...]] = ("event_id",)
    reference_params: ClassVar[dict[str, bool | int | str]] = {"dedup_event_id": True}
