"""Hostile Kafka records: hypothesis strategies for values (the parser property) and a seeded
generator of whole records (the end-to-end fuzz through the real workers).

Values mix valid orders with every way a producer can get them wrong: random bytes, invalid UTF-8,
deep nesting, NaN/Infinity, wrong types, unknown types, unicode edge cases (lone surrogate escapes,
NUL, RTL marks, emoji, BOM), empty values, tombstones; whole records add null/binary keys, odd
headers, extreme timestamps the broker accepts and values near its 4 MiB limit.
"""

from __future__ import annotations

import json
import random
from typing import Any, NamedTuple

from hypothesis import strategies as st

TYPES = ["page_view", "add_to_cart", "purchase", "refund"]
EDGE_TEXT = ["", "\u0000", "\u202e", "\ufeff", "😀", "e\u0301", "\uffff", "\U0010ffff", "a" * 1000]
LONE_SURROGATES = [b'"\\ud800"', b'"\\udfff"', b'"\\ud83d"']
#: The broker's message.max.bytes is 4 MiB (4194304); keep room for the record overhead and headers.
HUGE = 4_150_000


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


values = st.one_of(
    valid_order(), valid_order(), wrong_typed_order(), special_number(), deep_json(), unicode_edge(),
    corrupted_bytes(), st.binary(max_size=200), st.sampled_from([b"", b" ", b"null", b"{}", b"[]", b"\n", None]),
)


@st.composite
def split_documents(draw: st.DrawFn) -> list[bytes]:
    """Neighbouring values, each malformed alone, whose concatenation is valid JSON text: two documents
    in one value next to a blank one, or a document cut in two. A decoder reading the batch as one
    stream would count them as good records."""
    first, second = draw(valid_order()), draw(valid_order())
    cut = draw(st.integers(1, len(second) - 1))
    blank = draw(st.sampled_from([b" ", b"\n", b"\r\n", b"\t"]))
    return draw(st.sampled_from([[first + blank + second, blank], [first + blank + second[:cut], second[cut:]]]))


#: batches of values, some neighbours related (``split_documents``)
batches = st.lists(st.one_of(values.map(lambda value: [value]), split_documents()), min_size=1, max_size=12).map(
    lambda runs: [value for run in runs for value in run]
)

# ---------------------------------------------------------------- seeded generation for the end-to-end fuzz
#
# The end-to-end test runs the real workers, so it generates one seeded batch (replayable with
# KAPPA_RELIABILITY_SEED) instead of letting hypothesis shrink through many worker runs. Each record
# carries the generator's own verdict (valid or not by construction), a third opinion next to the
# pipeline's parser and the independent rules in invariants.py.

#: A plain UTC day most generated records fall on (the one the test replays).
FUZZ_DAY = "2026-11-20"
FUZZ_DAY_MS = 1_795_132_800_000  # 2026-11-20T00:00:00Z
DAY_MS = 86_400_000
SAFE_TEXT = [t for t in EDGE_TEXT if t != "a" * 1000] + ["a" * 1000, "plain", "ünïcødé", "名前", "tab\there"]


class Generated(NamedTuple):
    """One generated record with its category and the generator's verdict (``valid`` by construction)."""

    category: str
    valid: bool
    record: FuzzRecord


def _text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(SAFE_TEXT)
    return "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800),
                                   rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(0, 12)))


def _order(rng: random.Random, **override: Any) -> dict[str, Any]:
    amount = rng.choice([rng.randrange(-10**6, 10**6), round(rng.uniform(-1e6, 1e6), rng.randrange(0, 6)), 0, -0.0])
    body = {"event_id": _text(rng), "user_id": _text(rng), "type": rng.choice(TYPES), "amount": amount}
    if rng.random() < 0.2:
        body["extra"] = rng.choice([None, [1, {"a": "b"}], "x" * rng.randrange(0, 50), {"n": {"m": []}}])
    return {**body, **override}


def _valid(rng: random.Random) -> bytes:
    return _dumps(_order(rng))


def _wrong_type(rng: random.Random) -> bytes:
    field = rng.choice(["event_id", "user_id", "type", "amount"])
    wrongs = [None, True, False, "1", "", [1], {"a": 1}] if field == "amount" else [None, True, 7, 1.5, [1], {"a": 1}]
    body = _order(rng, **{field: rng.choice(wrongs)})
    if rng.random() < 0.3:
        body.pop(field)  # missing is as wrong as mistyped
    return _dumps(body)


def _unknown_type(rng: random.Random) -> bytes:
    return _dumps(_order(rng, type=rng.choice(["checkout", "PURCHASE", " purchase", "", "refund\u0000", "pageview"])))


def _bad_json(rng: random.Random) -> bytes:
    value = _valid(rng)
    how = rng.choice(["truncate", "literal", "bom", "trailing", "single-quotes"])
    if how == "truncate":
        return value[: rng.randrange(0, len(value) - 1)]
    if how == "literal":
        literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e15"])
        return b'{"event_id":"e","user_id":"u","type":"refund","amount":' + literal + b"}"
    if how == "bom":
        return b"\xef\xbb\xbf" + value
    if how == "trailing":
        return value + b"}"
    return value.replace(b'"', b"'")


def _invalid_utf8(rng: random.Random) -> bytes:
    """A valid order but for invalid UTF-8 in an id or in an extra field nobody reads."""
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe9t\xe9", b"\x80"])
    body = _valid(rng)
    if rng.random() < 0.3:
        return body[:-1] + b',"note":"' + bad + b'"}'
    where = rng.choice([b'"event_id":"', b'"user_id":"'])
    return body.replace(where, where + bad, 1)


def _lone_surrogate(rng: random.Random) -> bytes:
    field = rng.choice(["event_id", "user_id"])
    escaped = rng.choice(LONE_SURROGATES).decode()
    return _dumps(_order(rng, **{field: "SURROGATE"})).replace(b'"SURROGATE"', escaped.encode(), 1)


def _deep(rng: random.Random) -> bytes:
    depth = rng.randrange(5_000, 20_000)
    return b"[" * depth + b"]" * depth if rng.random() < 0.5 else \
        b'{"event_id":"e","user_id":"u","type":"purchase","amount":' + b"[" * depth + b"]" * depth + b"}"


def _not_an_order(rng: random.Random) -> bytes | None:
    return rng.choice([None, b"", b" ", b"null", b"{}", b"[]", b"\n", b"0", b'"purchase"', b"true", b"[{}]"])


def _random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 300))


#: ``category -> (value maker, valid by construction)``.
MAKERS: dict[str, tuple[Any, bool]] = {
    "valid": (_valid, True),
    "wrong_type": (_wrong_type, False),
    "unknown_type": (_unknown_type, False),
    "bad_json": (_bad_json, False),
    "invalid_utf8": (_invalid_utf8, False),
    "lone_surrogate": (_lone_surrogate, False),
    "deep_json": (_deep, False),
    "not_an_order": (_not_an_order, False),
    "random_bytes": (_random_bytes, False),
}
#: How often each category is drawn after every category has appeared once.
WEIGHTS = {"valid": 10, "wrong_type": 3, "unknown_type": 2, "bad_json": 3, "invalid_utf8": 2, "lone_surrogate": 1,
           "deep_json": 1, "not_an_order": 2, "random_bytes": 3}


def _key(rng: random.Random) -> bytes | None:
    return rng.choice([None, None, rng.randbytes(rng.randrange(0, 40)), _text(rng).encode(), b"", b"user-1"])


def _headers(rng: random.Random) -> list[tuple[str, bytes | None]]:
    names = ["", "h", "h", "content-type", "\u202e", "😀", "x" * 200, "trace\u0000id"]
    return [(rng.choice(names), rng.choice([None, b"", rng.randbytes(rng.randrange(0, 30)), b"\xff\xfe"]))
            for _ in range(rng.choice([0, 0, 1, 2, 5]))]


def _timestamp(rng: random.Random, now_ms: int) -> int:
    """Mostly inside :data:`FUZZ_DAY`; sometimes the extremes the broker accepts: 1 ms after the epoch
    (librdkafka reads 0 as "now"), early 1970, recent past, and up to 50 minutes ahead (it refuses > 1 h)."""
    draw = rng.random()
    if draw < 0.85:
        return FUZZ_DAY_MS + rng.randrange(DAY_MS)
    return rng.choice([1, rng.randrange(1, 10**6), rng.randrange(1_700_000_000_000, now_ms),
                       now_ms + rng.randrange(0, 50 * 60_000)])


def _huge(rng: random.Random, valid: bool) -> bytes:
    size = rng.randrange(HUGE - 50_000, HUGE)
    if valid:
        return b'{"event_id":"' + b"x" * size + b'","user_id":"u","type":"purchase","amount":3}'
    return rng.randbytes(16) * (size // 16)


def generate(rng: random.Random, count: int, now_ms: int, huge: int = 2) -> list[Generated]:
    """``count`` hostile records: every category at least once, then drawn by :data:`WEIGHTS`; ``huge`` of
    them near the broker's 4 MiB limit (alternately a valid order and random bytes)."""
    categories = list(MAKERS) + rng.choices(list(WEIGHTS), list(WEIGHTS.values()), k=max(0, count - len(MAKERS) - huge))
    out = []
    for category in categories:
        maker, valid = MAKERS[category]
        record = FuzzRecord(_key(rng), maker(rng), _headers(rng), _timestamp(rng, now_ms))
        out.append(Generated(category, valid, record))
    for index in range(huge):
        valid = index % 2 == 0
        record = FuzzRecord(_key(rng), _huge(rng, valid), _headers(rng), _timestamp(rng, now_ms))
        out.append(Generated("huge_valid" if valid else "huge_bytes", valid, record))
    rng.shuffle(out)
    return out


def _shown(data: bytes | None, limit: int = 60) -> str:
    if data is None:
        return "null"
    text = repr(data[:limit])
    return text + (f"... ({len(data):,} bytes)" if len(data) > limit else "")


def example(seed: int, batch: list[Generated], size: int = 8) -> dict[str, Any]:
    """The figure recorded for the doc: the seed, what was generated, and a few records shown."""
    shown, seen = [], set()
    for item in batch:
        if item.category not in seen and len(shown) < size:
            seen.add(item.category)
            r = item.record
            shown.append({"category": item.category, "valid": item.valid, "key": _shown(r.key),
                          "value": _shown(r.value), "headers": [(k[:20], _shown(v, 12)) for k, v in r.headers][:3],
                          "timestamp_ms": r.timestamp_ms})
    categories: dict[str, int] = {}
    for item in batch:
        categories[item.category] = categories.get(item.category, 0) + 1
    return {"seed": seed, "records": len(batch), "valid": sum(i.valid for i in batch),
            "categories": dict(sorted(categories.items())), "sample": shown,
            "replay": f"KAPPA_RELIABILITY_SEED={seed} pytest -s tests/reliability/test_bad_input.py -k end_to_end"}
