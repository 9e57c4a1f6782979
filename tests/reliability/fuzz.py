"""Hypothesis strategies for hostile Kafka records: values, keys, headers and timestamps.

Values mix valid orders with every way a producer can get them wrong: random bytes, invalid UTF-8,
deep nesting, NaN/Infinity, wrong types, unknown types, unicode edge cases (lone surrogate escapes,
NUL, RTL marks, emoji, BOM), empty values, tombstones, and huge values near the broker's 4 MiB limit.
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

from hypothesis import strategies as st

TYPES = ["page_view", "add_to_cart", "purchase", "refund"]
EDGE_TEXT = ["", "\u0000", "\u202e", "\ufeff", "😀", "e\u0301", "\uffff", "\U0010ffff", "a" * 1000]
LONE_SURROGATES = [b'"\\ud800"', b'"\\udfff"', b'"\\ud83d"']
#: The broker's message.max.bytes is 4 MiB (4194304); keep room for the record overhead and headers.
HUGE = 4_150_000
HOUR_MS = 3_600_000


class FuzzRecord(NamedTuple):
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp_ms: int


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


texts = st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=20))
amounts = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


@st.composite
def valid_order(draw: st.DrawFn) -> bytes:
    body = {"event_id": draw(texts), "user_id": draw(texts), "type": draw(st.sampled_from(TYPES)),
            "amount": draw(amounts)}
    extra = draw(st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
    return _dumps({**extra, **body})


@st.composite
def wrong_typed_order(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {"event_id": "e", "user_id": "u", "type": "purchase", "amount": 1}
    field = draw(st.sampled_from(sorted(body)))
    body[field] = draw(st.one_of(st.none(), st.booleans(), st.integers(), st.lists(st.integers(), max_size=2),
                                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
                                 st.sampled_from(["1", "purchase ", "PURCHASE", "checkout"])))
    if draw(st.booleans()):
        del body[draw(st.sampled_from(sorted(body)))]
    return _dumps(body)


@st.composite
def special_number(draw: st.DrawFn) -> bytes:
    literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e15", b"-0",
                                    b"123456789012345678901234567890", b"0.1e-400"]))
    return b'{"event_id":"e","user_id":"u","type":"refund","amount":' + literal + b"}"


@st.composite
def deep_json(draw: st.DrawFn) -> bytes:
    depth = draw(st.one_of(st.integers(1, 200), st.integers(5_000, 20_000)))
    nested = b"[" * depth + b"]" * depth
    where = draw(st.sampled_from(["top", "extra", "amount"]))
    if where == "top":
        return nested
    if where == "extra":
        return b'{"event_id":"e","user_id":"u","type":"purchase","amount":1,"x":' + nested + b"}"
    return b'{"event_id":"e","user_id":"u","type":"purchase","amount":' + nested + b"}"


@st.composite
def unicode_edge(draw: st.DrawFn) -> bytes:
    surrogate = draw(st.sampled_from(LONE_SURROGATES))
    field = draw(st.sampled_from([b"event_id", b"user_id", b"type"]))
    body = b'{"event_id":"e","user_id":"u","type":"purchase","amount":2}'
    return body.replace(b'"' + field + b'":"', b'"' + field + b'":' + surrogate + b',"_":"', 1)


@st.composite
def corrupted_bytes(draw: st.DrawFn) -> bytes:
    """A valid order with a few bytes flipped, truncated, or prefixed with a BOM / invalid UTF-8."""
    value = bytearray(draw(valid_order()))
    how = draw(st.sampled_from(["flip", "truncate", "bom", "latin1"]))
    if how == "flip" and value:
        index = draw(st.integers(0, len(value) - 1))
        value[index] = draw(st.integers(0, 255))
    elif how == "truncate":
        value = value[: draw(st.integers(0, max(0, len(value) - 1)))]
    elif how == "bom":
        value = bytearray(b"\xef\xbb\xbf") + value
    else:
        value = value.replace(b'"u', b'"\xe9', 1)
    return bytes(value)


@st.composite
def huge_value(draw: st.DrawFn) -> bytes:
    """Near the broker's limit: either one huge valid order (a long event_id) or huge random-ish bytes."""
    size = draw(st.integers(HUGE - 50_000, HUGE))
    if draw(st.booleans()):
        return b'{"event_id":"' + b"x" * size + b'","user_id":"u","type":"purchase","amount":3}'
    return draw(st.binary(min_size=16, max_size=16)) * (size // 16)


values = st.one_of(
    valid_order(), valid_order(), wrong_typed_order(), special_number(), deep_json(), unicode_edge(),
    corrupted_bytes(), st.binary(max_size=200), st.sampled_from([b"", b" ", b"null", b"{}", b"[]", b"\n", None]),
)
keys = st.one_of(st.none(), st.binary(max_size=40), texts.map(lambda t: t.encode("utf-8", "surrogatepass")))
headers = st.lists(st.tuples(texts, st.one_of(st.none(), st.binary(max_size=30))), max_size=4)


def timestamps(now_ms: int | None = None) -> st.SearchStrategy[int]:
    """Epoch (1 ms: librdkafka reads 0 as "now"), early, ordinary and near-future times.

    The broker refuses timestamps more than ``log.message.timestamp.after.max.ms`` (1 h) ahead, so
    "far future" records can never enter the topic; the latest we send is 50 minutes ahead.
    """
    now_ms = now_ms or int(time.time() * 1000)
    return st.one_of(
        st.just(1), st.integers(1, 10**6), st.integers(1_700_000_000_000, now_ms),
        st.integers(now_ms, now_ms + 50 * 60_000),
    )


def records(max_size: int = 40, huge: bool = True) -> st.SearchStrategy[list[FuzzRecord]]:
    """A batch of hostile records; ``huge`` adds up to two values near the 4 MiB limit."""
    one = st.builds(FuzzRecord, keys, values, headers, timestamps())
    big = st.builds(FuzzRecord, keys, huge_value(), headers, timestamps())
    extra = st.lists(big, max_size=2) if huge else st.just([])
    return st.tuples(st.lists(one, min_size=1, max_size=max_size), extra).map(lambda pair: pair[0] + pair[1])


#: Always tried: a bad and a valid value near the broker's limit, at the epoch and in a normal day.
NEAR_LIMIT_EXAMPLE = [
    FuzzRecord(b"k", b"\x00\xff" * (HUGE // 2), [("h", None)], 1),
    FuzzRecord(None, b'{"event_id":"' + b"x" * HUGE + b'","user_id":"u","type":"purchase","amount":3}', [],
               1_790_000_000_000),
    FuzzRecord(b"k", b'{"event_id":"e","user_id":"u","type":"refund","amount":-2.5}', [], 1),
]
