"""The reference ``orders`` event generator, with the faults real producers make.

Generation is pure (seed + spec -> the same records, each labelled with its ``kind``) so tests know
what to expect without Kafka; duplicates, late, malformed and rerouted records and the keyings are
described in docs/ARCHITECTURE.md, "The generator".
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from confluent_kafka import KafkaError, Producer

from workers import kafka as kafka_helpers
from workers import keys
from workers.config import Settings
from workers.errors import KappaError

EVENT_TYPES = ("page_view", "add_to_cart", "purchase", "refund")
TYPE_WEIGHTS = (60, 20, 15, 5)
SOURCES = (b"web", b"ios", b"android", b"pos")
MALFORMED_SORTS = (
    "not_json",
    "invalid_utf8",
    "missing_field",
    "ill_typed",
    "unknown_type",
    "not_object",
    "empty",
    "null",
)
VALID, DUPLICATE, LATE = "valid", "duplicate", "late"
MALFORMED_PREFIX = "malformed."
DAY_MS = 86_400_000
#: librdkafka reads a 0 timestamp as "now", so the earliest event time a producer can send is 1 ms.
MIN_TIMESTAMP_MS = 1
LATE_MIN_MS, LATE_MAX_MS = 60_000, 6 * 3_600_000
JITTER_MS = 1_000
DUPLICATE_WINDOW = 5_000
#: user: by user_id (Faults.null_keys of them null); none: every key null (librdkafka's default
#: partitioner spreads them at random); random: a random key per event; event-id: by event_id
KEYINGS = ("user", "none", "random", "event-id")
#: keys and re-routing draw from their own stream (seeded from the seed) so values stay identical
KEY_STREAM_SALT = 0x6B657973

PRODUCER_CONFIG: dict[str, object] = {
    "linger.ms": 50,
    "batch.size": 1_048_576,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 262_144,
    # idempotence: broker-side retries never create duplicates we did not ask for
    "enable.idempotence": True,
    "acks": "all",
    # Java-compatible hashing (what a Java producer would pick for the same key); where copies of
    # one event land no longer matters to orders v2, which dedups across partitions (the shuffle):
    # --keying and --rerouted-duplicates spread them on purpose
    "partitioner": "murmur2",
}


class Record(NamedTuple):
    """One record to produce. ``kind`` is ``valid``, ``duplicate``, ``late`` or ``malformed.<sort>``."""

    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: list[tuple[str, bytes]]
    kind: str


@dataclass(frozen=True)
class Faults:
    """Shares (0..1) of records that are duplicates, late or malformed; plus null keys and headers."""

    duplicates: float = 0.0
    late: float = 0.0
    malformed: float = 0.0
    null_keys: float = 0.02
    headers: float = 0.3
    #: share of the duplicates re-sent with another key (another path, usually another partition)
    rerouted: float = 0.0

    def validate(self) -> Faults:
        for name in ("duplicates", "late", "malformed", "null_keys", "headers", "rerouted"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise KappaError(f"--{name.replace('_', '-')} must be a share between 0 and 1, got {share}")
        if self.duplicates + self.late + self.malformed > 1.0:
            raise KappaError("--duplicates + --late + --malformed must not exceed 1")
        return self


def is_malformed(kind: str) -> bool:
    return kind.startswith(MALFORMED_PREFIX)


def generate(
    count: int,
    *,
    start_ms: int,
    span_ms: int = DAY_MS,
    seed: int = 0,
    faults: Faults = Faults(),
    users: int = 1000,
    keying: str = "user",
) -> Iterator[Record]:
    """Yield ``count`` records whose stream time runs evenly from ``start_ms`` over ``span_ms``.

    Pure and deterministic: the same arguments always give the same records in the same order.
    """
    if count < 0 or span_ms < 0 or users < 1:
        raise KappaError("count and span must be >= 0 and users >= 1")
    keyer = _Keyer(valid_keying(keying), random.Random(seed ^ KEY_STREAM_SALT))
    state = _GeneratorState(random.Random(seed), faults.validate(), users, keyer)
    for index in range(count):
        stream_ms = start_ms + (index * span_ms) // max(count, 1)
        yield state.next_record(stream_ms)


def valid_keying(keying: str) -> str:
    if keying not in KEYINGS:
        raise KappaError(f"--keying must be one of {', '.join(KEYINGS)}, got {keying!r}")
    return keying


class _Keyer:
    """The record key of an event under a keying, from a random stream of its own."""

    def __init__(self, keying: str, rng: random.Random) -> None:
        self.keying, self.rng = keying, rng

    def key(self, body: dict, null: bool) -> bytes | None:
        if self.keying == "user":
            return None if null else str(body.get("user_id", "")).encode()
        if self.keying == "event-id":
            return str(body.get("event_id", "")).encode()
        if self.keying == "random":
            return f"k{self.rng.getrandbits(64):016x}".encode()
        return None

    def reroute(self, record: Record, share: float) -> Record:
        """A re-send through another path: the same record under a session key of another service."""
        if share <= 0 or self.rng.random() >= share:
            return record
        return record._replace(key=f"session-{self.rng.getrandbits(32):08x}".encode())


class _GeneratorState:
    """The random source plus the recent events duplicates are drawn from."""

    def __init__(self, rng: random.Random, faults: Faults, users: int, keyer: _Keyer) -> None:
        self.rng, self.faults, self.users, self.keyer = rng, faults, users, keyer
        self.recent: list[Record] = []
        self.recent_next = 0

    def next_record(self, stream_ms: int) -> Record:
        draw, faults = self.rng.random(), self.faults
        if draw < faults.duplicates and self.recent:
            original = self.recent[self.rng.randrange(len(self.recent))]
            return self.keyer.reroute(original._replace(kind=DUPLICATE), faults.rerouted)
        if draw < faults.duplicates + faults.late:
            return self._remember(self._event(stream_ms - self.rng.randrange(LATE_MIN_MS, LATE_MAX_MS), LATE))
        if draw < faults.duplicates + faults.late + faults.malformed:
            return self._malformed(self._jittered(stream_ms))
        return self._remember(self._event(self._jittered(stream_ms), VALID))

    def _jittered(self, stream_ms: int) -> int:
        """A little disorder (< 1 s), as from several producers; far less than any grace period."""
        return stream_ms - self.rng.randrange(JITTER_MS)

    def _remember(self, record: Record) -> Record:
        """Keep a bounded ring of recent events: duplicates are re-sends of something recent."""
        if len(self.recent) < DUPLICATE_WINDOW:
            self.recent.append(record)
        else:
            self.recent[self.recent_next] = record
            self.recent_next = (self.recent_next + 1) % DUPLICATE_WINDOW
        return record

    def _body(self) -> dict:
        rng = self.rng
        event_type = rng.choices(EVENT_TYPES, TYPE_WEIGHTS)[0]
        amount = 0 if event_type == "page_view" else round(rng.uniform(1, 500), 2)
        return {
            "event_id": f"{rng.getrandbits(64):016x}",
            "user_id": f"u{rng.randrange(self.users):05d}",
            "type": event_type,
            "amount": amount,
        }

    def _envelope(self, body: dict, value: bytes | None, timestamp_ms: int, kind: str) -> Record:
        """Key (by the keying: user_id sometimes null), headers (sometimes), clamped timestamp."""
        rng, faults = self.rng, self.faults
        key = self.keyer.key(body, null=rng.random() < faults.null_keys)
        headers: list[tuple[str, bytes]] = []
        if rng.random() < faults.headers:
            headers.append(("source", rng.choice(SOURCES)))
            if rng.random() < 0.25:
                headers.append(("trace", rng.randbytes(8)))
        return Record(key, value, max(timestamp_ms, MIN_TIMESTAMP_MS), headers, kind)

    def _event(self, timestamp_ms: int, kind: str) -> Record:
        body = self._body()
        return self._envelope(body, _json(body), timestamp_ms, kind)

    def _malformed(self, timestamp_ms: int) -> Record:
        sort = self.rng.choice(MALFORMED_SORTS)
        body = self._body()
        return self._envelope(body, MALFORMERS[sort](self.rng, body), timestamp_ms, MALFORMED_PREFIX + sort)


def _json(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _not_json(rng: random.Random, body: dict) -> bytes:
    """Truncated JSON, plain text, a raw newline inside a string, or two documents in one value
    (these two break fast paths that decode a batch as one stream)."""
    whole = _json(body)
    truncated = whole[: rng.randrange(1, len(whole) - 1)]
    return rng.choice([truncated, b"not json at all", whole.replace(b'":"', b'":"\n', 1), whole + b" " + whole])


def _invalid_utf8(rng: random.Random, body: dict) -> bytes:
    return _json(body).replace(b'"user_id":"', b'"user_id":"\xff\xfe', 1)


def _missing_field(rng: random.Random, body: dict) -> bytes:
    missing = rng.choice(sorted(body))
    return _json({k: v for k, v in body.items() if k != missing})


def _ill_typed(rng: random.Random, body: dict) -> bytes:
    field_name, bad = rng.choice([("amount", str(body["amount"])), ("user_id", 42), ("event_id", None), ("type", 1)])
    return _json({**body, field_name: bad})


def _unknown_type(rng: random.Random, body: dict) -> bytes:
    return _json({**body, "type": rng.choice(["checkout", "PURCHASE", ""])})


def _not_object(rng: random.Random, body: dict) -> bytes:
    return rng.choice([b"[1,2,3]", b'"purchase"', b"42", b"null", _json([body])])


MALFORMERS: dict[str, Callable[[random.Random, dict], bytes | None]] = {
    "not_json": _not_json,
    "invalid_utf8": _invalid_utf8,
    "missing_field": _missing_field,
    "ill_typed": _ill_typed,
    "unknown_type": _unknown_type,
    "not_object": _not_object,
    "empty": lambda rng, body: rng.choice([b"", b" ", b"\r\n"]),
    "null": lambda rng, body: None,
}


# ---------------------------------------------------------------- producing


@dataclass
class ProduceSummary:
    """What was sent: counts per kind (``valid``, ``duplicate``, ``late``, ``malformed.<sort>``)."""

    topic: str
    partitions: int
    seed: int
    count: int = 0
    delivered: int = 0
    failed: int = 0
    kinds: Counter = field(default_factory=Counter)
    null_keys: int = 0
    with_headers: int = 0
    first_error: str | None = None
    min_timestamp_ms: int | None = None
    max_timestamp_ms: int | None = None
    seconds: float = 0.0

    @property
    def malformed(self) -> int:
        return sum(n for kind, n in self.kinds.items() if is_malformed(kind))

    def days(self) -> list[str]:
        """UTC days covered by the produced timestamps (late events may add an earlier one)."""
        if self.min_timestamp_ms is None or self.max_timestamp_ms is None:
            return []
        first, last = (_utc_day(ms) for ms in (self.min_timestamp_ms, self.max_timestamp_ms))
        return [str(first + dt.timedelta(days=n)) for n in range((last - first).days + 1)]

    def note(self, record: Record) -> None:
        self.count += 1
        self.kinds[record.kind] += 1
        self.null_keys += record.key is None
        self.with_headers += bool(record.headers)
        ts = record.timestamp_ms
        self.min_timestamp_ms = ts if self.min_timestamp_ms is None else min(self.min_timestamp_ms, ts)
        self.max_timestamp_ms = ts if self.max_timestamp_ms is None else max(self.max_timestamp_ms, ts)


def _utc_day(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date()


def parse_start(start: str | None, days: float, now: dt.datetime | None = None) -> int:
    """``--start`` as epoch ms: an ISO datetime (naive = UTC) or a day; default now minus the span."""
    if start is None:
        now = now or dt.datetime.now(dt.UTC)
        return int((now - dt.timedelta(days=days)).timestamp()) * 1000
    try:
        moment = dt.datetime.fromisoformat(start)
    except ValueError:
        raise KappaError(f"--start {start!r} is not an ISO date or datetime (e.g. 2026-11-20T08:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


class DeliveryError(KappaError):
    """Some records were not delivered; ``summary`` says how many and the first error."""

    def __init__(self, summary: ProduceSummary) -> None:
        super().__init__(
            f"{summary.failed} of {summary.count} records were not delivered to {summary.topic} "
            f"(first error: {summary.first_error or 'flush timed out'})"
        )
        self.summary = summary


class _Delivery:
    """Delivery-report bookkeeping: counts successes and failures, remembers the first error."""

    def __init__(self, summary: ProduceSummary) -> None:
        self.summary = summary

    def __call__(self, error: KafkaError | None, _message: object) -> None:
        if error is None:
            self.summary.delivered += 1
            return
        self.summary.failed += 1
        self.summary.first_error = self.summary.first_error or str(error)


class _Pacer:
    """Sleeps just enough to hold ``rate`` records/s (0 = as fast as possible)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.started = rate, time.monotonic()

    def wait(self, sent: int) -> None:
        if self.rate > 0:
            ahead = sent / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)


def _send(producer: Producer, topic: str, record: Record, on_delivery: _Delivery) -> None:
    """produce + poll(0); on a full local queue, serve delivery reports and try again."""
    while True:
        try:
            producer.produce(
                topic,
                value=record.value,
                key=record.key,
                timestamp=record.timestamp_ms,
                headers=record.headers or None,
                on_delivery=on_delivery,
            )
            break
        except BufferError:
            producer.poll(0.1)
    producer.poll(0)


def produce_events(
    settings: Settings,
    count: int,
    *,
    topic: str | None = None,
    start: str | int | None = None,
    days: float = 1.0,
    partitions: int = 6,
    seed: int | None = None,
    faults: Faults = Faults(),
    rate: float = 0.0,
    users: int = 1000,
    keying: str = "user",
    progress: Callable[[int], None] | None = None,
    flush_timeout: float = 120.0,
) -> ProduceSummary:
    """Produce ``count`` generated records to ``topic`` (default: the events topic), creating it if missing.

    ``start`` is epoch ms, an ISO string, or None (now minus ``days``). ``progress`` is called with
    the number of records sent since the last call. Raises :class:`KappaError` if any delivery failed.
    ``keying`` none uses librdkafka's default partitioner, random per record; the others murmur2.
    """
    check_options(count, days, partitions, rate)
    valid_keying(keying)
    topic = keys.valid_topic(settings.events_topic if topic is None else topic)
    start_ms = start if isinstance(start, int) else parse_start(start, days)
    kafka_helpers.ensure_topic(settings, topic, partitions)
    seed = random.randrange(2**32) if seed is None else seed
    summary = ProduceSummary(topic=topic, partitions=kafka_helpers.partition_count(settings, topic), seed=seed)
    # null keys: librdkafka's default partitioner, made random per record (its sticky batching would
    # keep nearby copies of one event on one partition and hide cross-partition duplicates)
    partitioner = {"partitioner": "consistent_random", "sticky.partitioning.linger.ms": 0} if keying == "none" else {}
    producer = Producer(settings.kafka_config(**{**PRODUCER_CONFIG, **partitioner}))
    on_delivery, pacer = _Delivery(summary), _Pacer(rate)
    started = time.monotonic()
    span_ms = int(days * DAY_MS)
    records = generate(count, start_ms=start_ms, span_ms=span_ms, seed=seed, faults=faults, users=users, keying=keying)
    for record in records:
        _send(producer, topic, record, on_delivery)
        summary.note(record)
        if summary.count % 1000 == 0:
            pacer.wait(summary.count)
            if progress:
                progress(1000)
    remaining = producer.flush(flush_timeout)
    if progress:
        progress(summary.count % 1000)
    summary.seconds = time.monotonic() - started
    summary.failed += remaining
    if summary.failed:
        raise DeliveryError(summary)
    return summary


def check_options(count: int, days: float, partitions: int, rate: float) -> None:
    """The numeric options, checked before anything connects."""
    if count < 0:
        raise KappaError(f"--count must be >= 0, got {count}")
    if days <= 0:
        raise KappaError(f"--days must be > 0, got {days}")
    if partitions < 1:
        raise KappaError(f"--partitions must be >= 1, got {partitions}")
    if rate < 0:
        raise KappaError(f"--rate must be >= 0 (0 = as fast as possible), got {rate}")
