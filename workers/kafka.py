"""confluent-kafka helpers: one place builds clients and creates topics with explicit partitions."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic, OffsetSpec

from workers import keys
from workers.config import Settings
from workers.errors import KappaError, UnreachableError

log = logging.getLogger("kappa.kafka")

#: Consumer settings of the bulk readers (archiver, processor). librdkafka's defaults fetch at most
#: 1 MiB per partition and refill its prefetch queue from 100k messages, so a Python consumer that
#: drains ~10k messages per call keeps waiting on fetches: with these it reads ~1.8x faster (measured
#: 155k -> 270-295k rec/s with a bare consume loop on a 3-partition replay topic). The prefetch queue
#: is capped by ``queued.max.messages.kbytes`` (default 64 MiB); what one ``consume()`` call takes
#: off it is not (``ConsumeBudget``). The shuffle fetches less (``shuffle.SHUFFLE_PREFETCH``).
#: Once that queue is full librdkafka postpones a partition's next fetch by ``fetch.queue.backoff.ms``,
#: 1 s by default: a consumer faster than one fetch round then idles for most of each second (a loop
#: building the archiver's frames with its 32 MiB queue, 6 partitions: 210k -> 276k rec/s with 10 ms,
#: as fast as with a 128 MiB queue).
BULK_CONSUMER_TUNING: dict[str, object] = {
    "queued.min.messages": 1_000_000,
    "max.partition.fetch.bytes": 8 * 1024 * 1024,
    "fetch.queue.backoff.ms": 10,
}


#: what one consume() call may hold, in message bytes (``ConsumeBudget``)
CONSUME_BYTES = 16 * 1024 * 1024
#: messages of a consume() result whose sizes estimate its mean size
SIZE_SAMPLES = 32


class ConsumeBudget:
    """How many messages the next ``consume()`` may ask for, so that its result stays near ``max_bytes``.

    ``consume(n, timeout)`` takes messages off librdkafka's queue until it holds ``n`` or the timeout
    passes, and librdkafka refills the queue meanwhile: its prefetch cap does not bound what one call
    returns, only ``n`` does. With the shuffle's ~1 MiB frames, ``n = 20,000`` let one call of stage 2
    take the whole backlog stage 1 had produced (2.2 GiB at 10M events, benchmarks/README.md, "The
    second issue-14 round"). The mean message size comes from a few messages of the last result.
    """

    def __init__(self, max_messages: int, max_bytes: int = CONSUME_BYTES) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.count = min(max_messages, SIZE_SAMPLES)  # sizes unknown yet: a few messages first

    def messages(self) -> int:
        return self.count

    def observe(self, messages: list[Message]) -> None:
        if not messages:
            return
        step = max(1, len(messages) // SIZE_SAMPLES)
        sample = messages[::step]
        mean = sum(len(m.value() or b"") + len(m.key() or b"") for m in sample) / len(sample)
        self.count = max(1, min(self.max_messages, int(self.max_bytes // max(mean, 1.0))))


_admins: dict[tuple[int, str], AdminClient] = {}
_admins_lock = threading.Lock()


def admin_client(settings: Settings, quiet: bool = False) -> AdminClient:
    """The process's AdminClient for these settings; ``quiet`` silences librdkafka's connection-refused
    chatter (for probes). Shared: a new client first connects (~50 ms on a local broker, one processor
    start made four). Never asks the broker to auto-create a topic it looks up; per process id, since
    a librdkafka handle does not survive a fork."""
    config = admin_config(settings, quiet)
    key = (os.getpid(), json.dumps(config, sort_keys=True, default=repr))
    with _admins_lock:
        if key not in _admins:
            _admins[key] = AdminClient(config)
        return _admins[key]


def drop_admin_clients() -> None:
    """Forget the shared clients, whose handles are then destroyed: for a process that outlives its
    cluster (the test session stops its stacks; a kept client would reconnect to them until exit)."""
    with _admins_lock:
        _admins.clear()


def admin_config(settings: Settings, quiet: bool = False, **extra: Any) -> dict[str, Any]:
    """An admin client's settings: never auto-creates a topic it looks up; ``quiet``: no librdkafka logs."""
    return settings.kafka_config(**{"allow.auto.create.topics": False, **({"log_level": 0} if quiet else {}), **extra})


def check_reachable(settings: Settings, timeout: float = 10.0) -> ClusterMetadata:
    """Fetch cluster metadata or fail with a clear message: at once when librdkafka finds every
    bootstrap broker down (a refused connection, an unknown host), else within ``timeout`` seconds.
    Commands call it first, so a wrong address is one line in a second, not a later call's timeout."""
    down = threading.Event()

    def on_error(error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            down.set()

    probe = AdminClient(admin_config(settings, quiet=True, error_cb=on_error))  # its own: a callback of this call
    deadline = time.monotonic() + timeout
    while True:
        try:
            metadata = probe.list_topics(timeout=max(0.1, min(0.5, deadline - time.monotonic())))
            break
        except KafkaException as exc:
            probe.poll(0)  # serves error_cb
            if down.is_set() or time.monotonic() >= deadline:
                reason = "every broker is down" if down.is_set() else f"no answer within {timeout:.0f}s"
                raise UnreachableError(
                    f"Kafka at {settings.bootstrap_servers}: {reason} ({exc.args[0].str()}); "
                    "start it with `kappa stack up` or check KAPPA_BOOTSTRAP_SERVERS and the security settings"
                ) from None
    if not metadata.brokers:
        raise UnreachableError(f"Kafka at {settings.bootstrap_servers} answered with no brokers")
    return metadata


def ensure_topic(
    settings: Settings,
    topic: str,
    partitions: int,
    config: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> bool:
    """Create ``topic`` if missing (auto creation is off). Returns True if it was created."""
    admin = admin_client(settings)
    if exists(admin, topic, timeout):
        return False
    replication = settings.topic_replication
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=replication, config=config or {})],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    try:
        futures[topic].result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
        return False
    deadline = time.monotonic() + timeout
    while not exists(admin, topic, timeout) and time.monotonic() < deadline:  # creation is asynchronous
        time.sleep(0.2)
    return True


def exists(admin: AdminClient, topic: str, timeout: float) -> bool:
    """One topic's metadata, not the cluster's (a full listing took 70 ms with 1,000 topics)."""
    info = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    return info is not None and info.error is None


def wait_gone(admin: AdminClient, topics: Iterable[str], timeout: float) -> None:
    """Topic deletion finishes asynchronously: wait until no metadata answer shows ``topics`` any more
    (one topic's metadata per lookup, not the cluster's)."""
    deadline = time.monotonic() + timeout
    left = list(topics)
    while left and time.monotonic() < deadline:
        left = [topic for topic in left if exists(admin, topic, timeout)]
        if left:
            time.sleep(0.2)


def delete_topics(settings: Settings, topics: Iterable[str], timeout: float = 30.0) -> None:
    topics = list(topics)
    if not topics:
        return
    admin = admin_client(settings)
    for topic, future in admin.delete_topics(topics, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise RuntimeError(f"could not delete topic {topic}: {exc}") from exc
    # deletion is asynchronous on the broker: wait until metadata no longer lists the topics, so a
    # topic of the same name can be re-created right away
    wait_gone(admin, topics, timeout)


def partition_count(settings: Settings, topic: str, timeout: float = 30.0) -> int:
    metadata = admin_client(settings).list_topics(topic, timeout=timeout)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None:
        raise UnreachableError(f"topic {topic!r} does not exist on {settings.bootstrap_servers}")
    return len(info.partitions)


def topic_id(settings: Settings, topic: str, timeout: float = 30.0) -> str:
    """The topic's id (a UUID the broker gives each topic at creation): tells a recreated topic apart."""
    admin = admin_client(settings)  # kept referenced until the answer arrives
    future = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout)[topic]
    return str(future.result(timeout=timeout).topic_id)


def end_offsets(settings: Settings, topic: str, timeout: float = 30.0) -> dict[int, int]:
    """High watermark per partition: the offset the next record will get.

    Asked with read_uncommitted: under read_committed the broker answers with the last stable offset,
    which an open transaction (e.g. a killed stage 1's, until its timeout) holds back, so "reached the
    end" would hold while committed records past it are still unread. Transient errors (a broker
    restart, a leader election) are retried until ``timeout``."""
    admin = admin_client(settings)
    deadline = time.monotonic() + timeout
    partitions = [TopicPartition(topic, p) for p in range(partition_count(settings, topic, timeout))]
    while True:
        try:
            futures = admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions},
                                         isolation_level=IsolationLevel.READ_UNCOMMITTED,
                                         request_timeout=max(1.0, deadline - time.monotonic()))
            return {tp.partition: future.result().offset for tp, future in futures.items()}
        except KafkaException as exc:
            if not is_transient(exc.args[0]) or time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


#: Errors a broker restart or leader election causes for a few seconds: retried until the deadline.
TRANSIENT_ERRORS = frozenset({
    KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
    KafkaError._ALL_BROKERS_DOWN, KafkaError.REQUEST_TIMED_OUT,
    # the first seconds after a broker start: it does not know yet the leader epoch a client sends
    KafkaError.UNKNOWN_LEADER_EPOCH, KafkaError.FENCED_LEADER_EPOCH,
    # a group's coordinator moving or loading its offsets after a broker restart: retriable in the
    # protocol, but committed() raises them unflagged (confluent-kafka builds the error from the code)
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
})


def is_transient(error: KafkaError) -> bool:
    """Worth retrying until a deadline: what librdkafka flags retriable, or a ``TRANSIENT_ERRORS``
    code it does not flag (e.g. ``committed()``'s plain "Local: Timed out" after a broker restart).
    Never an error that dooms the open transaction: calling again cannot succeed (the producer is
    in its abortable state), only an abort can."""
    if error.fatal() or error.txn_requires_abort():
        return False
    return error.retriable() or error.code() in TRANSIENT_ERRORS


class Stopped(Exception):
    """A retry given up because the worker was asked to stop (carries the last error)."""


def retrying(call: Callable[[], Any], seconds: float = 120.0, timeouts: bool = True,
             stop: threading.Event | None = None) -> Any:
    """Retry transient Kafka errors (``kafka.is_transient``: a broker restart, a coordinator moving)
    for up to ``seconds``. ``timeouts=False``: a call that timed out is not tried again on the same
    client. After a broker restart its coordinator connection can stay stuck (librdkafka#5511), and
    each retry waited out its whole timeout: a stage 1 spent 45 s on three ``committed()`` calls
    before it rejoined (RELIABILITY F10). The caller replaces the client instead.

    ``stop`` set: no further try (raises :class:`Stopped`); a supervisor stopping the worker during
    an outage waited out minutes of retries (RELIABILITY F11)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            stuck = not timeouts and error.code() == KafkaError._TIMED_OUT
            if stuck or not is_transient(error) or time.monotonic() > deadline:
                raise
            if stop is not None and stop.is_set():
                raise Stopped(error.str()) from exc
            log.warning("Kafka: %s; retrying", error.str())
            time.sleep(0.5)


def read_headers(settings: Settings, topic: str, timeout: float = 60.0) -> Iterator[list[tuple[str, bytes | None]]]:
    """Every record's headers, from the beginning to the end offsets read at the start (nothing for a
    topic that does not exist). No group is joined and nothing is committed."""
    metadata = admin_client(settings).list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return
    ends = {p: e for p, e in end_offsets(settings, topic, timeout).items() if e > 0}
    consumer = Consumer(settings.kafka_config(**{"group.id": keys.OFFSETS_PROBE_GROUP, "enable.auto.commit": False}))
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while ends:
            if time.monotonic() > deadline:
                raise UnreachableError(f"reading {topic} did not reach its end offsets within {timeout:.0f}s")
            for message in consumer.consume(num_messages=10_000, timeout=1.0):
                if message.error() is None and message.offset() < ends.get(message.partition(), 0):
                    yield message.headers() or []
            # positions, not record offsets: transaction markers take offsets no record has
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    ends.pop(tp.partition)
    finally:
        consumer.close()


def offsets_json(offsets: dict[int, int]) -> dict[str, int]:
    return {str(p): int(o) for p, o in sorted(offsets.items())}


def delete_group(settings: Settings, group: str, timeout: float = 60.0) -> None:
    """Delete a consumer group; waits up to ``timeout`` for a dead member's session to end
    (NON_EMPTY_GROUP) and for a coordinator that is moving or still loading after a broker start
    (``is_transient``: COORDINATOR_LOAD_IN_PROGRESS stopped a processor on a freshly started broker)."""
    admin = admin_client(settings)
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.delete_consumer_groups([group], request_timeout=30)[group].result()
            return
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.GROUP_ID_NOT_FOUND:
                return
            waitable = error.code() == KafkaError.NON_EMPTY_GROUP or is_transient(error)
            if not waitable or time.monotonic() > deadline:
                raise KappaError(f"could not delete consumer group {group}: {error.str()}") from None
        time.sleep(2)


def recreate_topic(
    settings: Settings, topic: str, partitions: int, config: dict[str, str], timeout: float = 90.0
) -> None:
    """Delete ``topic`` if present, then create it empty (retrying while Kafka finishes the delete)."""
    admin = admin_client(settings)
    delete_topics(settings, [topic])
    deadline = time.monotonic() + timeout
    replication = settings.topic_replication
    while True:
        if not exists(admin, topic, 30):
            new = NewTopic(topic, num_partitions=partitions, replication_factor=replication, config=config)
            try:
                admin.create_topics([new], operation_timeout=30, request_timeout=30)[topic].result()
                return
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        if time.monotonic() > deadline:
            raise KappaError(f"topic {topic} is still being deleted after {timeout:.0f}s")
        time.sleep(0.5)


def topic_end_offsets(settings: Settings, topic: str) -> dict[str, int] | None:
    """End offsets as stored in the manifest, or None when the topic does not exist."""
    if not exists(admin_client(settings), topic, 30):
        return None
    return offsets_json(end_offsets(settings, topic))


class StuckCall(Exception):
    """A librdkafka call that did not return in time (its own timeout was not honoured)."""


def call_within(call: Callable[[], Any], seconds: float) -> Any:
    """Run ``call`` on a helper thread; raise :class:`StuckCall` if it has not returned in ``seconds``.

    After a broker restart, ``send_offsets_to_transaction`` can wait forever for a coordinator that
    librdkafka decommissioned while the broker was down (librdkafka#5511), whatever its timeout, and a
    consumer's ``close()`` for a coordinator that does not answer. The stuck thread is abandoned with
    its client; the caller replaces the client.
    """
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller below
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="kappa-kafka-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise StuckCall(f"a Kafka call did not return within {seconds:.0f}s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


#: a consumer closing (leaving its group) longer than this is stuck on its coordinator: abandoned
CLOSE_LIMIT_S = 45.0
#: default --commit-timeout of the workers: a commit still waiting by then is parked on a stuck
#: coordinator connection, and the worker rejoins with a new consumer
COMMIT_LIMIT_S = 30.0
#: a failed (informational) offset commit is sent again this long after the last retry at the earliest
COMMIT_RETRY_S = 1.0


class OffsetCommits:
    """A consumer's offset commits, sent asynchronously and tracked until the broker answers.

    Why not synchronous: during a classic rebalance librdkafka holds a commit until the rebalance
    completes, and the rebalance waits for this member to poll (to run its revoke callback). A
    synchronous commit then waits out its whole bound while the group stalls: a member joining an
    archiver group cost 30 s (``--commit-timeout``) and a re-read of every buffer.

    An asynchronous commit is answered through ``on_commit``, which ``consume()`` serves. One left
    unanswered longer than ``limit`` while the worker polls is parked on a coordinator connection
    librdkafka never restores (librdkafka#5511, RELIABILITY F6): ``overdue()`` says so, and the
    worker rejoins with a new consumer. A failed commit is kept for ``take_failed()`` unless a newer
    one was sent for its partition since. One tracker per consumer: a replaced consumer's late
    answers go to its own tracker, not to its successor's.
    """

    def __init__(self, topic: str, limit: float, carried: dict[int, int] | None = None) -> None:
        """``carried``: a replaced consumer's ``pending()`` commits, sent again by this one."""
        self.topic, self.limit = topic, limit
        self.unanswered: deque[tuple[float, list[TopicPartition]]] = deque()
        self.latest: dict[int, int] = {}
        self.failed: dict[int, int] = dict(carried or {})
        self.retry_at = 0.0

    def config(self) -> dict[str, Any]:
        """The consumer settings that route commit answers here."""
        return {"on_commit": self.answered}

    def send(self, consumer: Consumer, offsets: list[TopicPartition], owned: Container[int]) -> None:
        """Commit ``offsets`` without waiting, with the failed commits of partitions still ``owned``
        that no newer offset replaces; a commit librdkafka refuses at once is kept as failed."""
        newer = {tp.partition for tp in offsets}
        offsets = [*offsets, *(TopicPartition(self.topic, partition, offset)
                               for partition, offset in self.take_failed().items()
                               if partition in owned and partition not in newer)]
        if not offsets:
            return
        for tp in offsets:
            self.latest[tp.partition] = tp.offset
            self.failed.pop(tp.partition, None)
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            self.keep_failed(exc.args[0], offsets)
            return
        self.unanswered.append((time.monotonic(), offsets))

    def answered(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """``on_commit``: one coordinator connection answers a consumer's commits in the order sent."""
        if self.unanswered:
            self.unanswered.popleft()
        self.keep_failed(error, partitions)

    def keep_failed(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """Keep each failed partition's offset for a retry, unless a newer one was sent since."""
        # ``error`` repeats the first partition's error: a partition without one of its own committed
        failed = [tp for tp in partitions if tp.error is not None] or (partitions if error is not None else [])
        for tp in failed:
            if self.latest.get(tp.partition) == tp.offset:
                self.failed[tp.partition] = tp.offset
        if failed:
            cause = error or failed[0].error
            rebalancing = cause.code() in (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION)
            log.log(logging.INFO if rebalancing else logging.WARNING,
                    "offset commit of partitions %s failed (informational, sent again while still ours): %s",
                    sorted(tp.partition for tp in failed), cause)

    def overdue(self, now: float | None = None) -> str | None:
        """Why the oldest commit counts as stuck, or None; call it right after ``consume()``."""
        if not self.unanswered:
            return None
        waited = (time.monotonic() if now is None else now) - self.unanswered[0][0]
        return f"an offset commit did not return within {self.limit:g}s" if waited > self.limit else None

    def pending(self) -> dict[int, int]:
        """The newest offset per partition not yet confirmed: failed, or still unanswered."""
        offsets = {tp.partition: tp.offset for _, sent in self.unanswered for tp in sent}
        return {**offsets, **self.failed}

    def take_failed(self, now: float | None = None) -> dict[int, int]:
        """The failed commits to send again (and forget here), once a second at most: a commit the
        broker refuses during a rebalance would otherwise be retried on every poll until it ends."""
        now = time.monotonic() if now is None else now
        if not self.failed or now < self.retry_at:
            return {}
        self.retry_at = now + COMMIT_RETRY_S
        failed, self.failed = self.failed, {}
        return failed


def close_within(client: Consumer | None, seconds: float = CLOSE_LIMIT_S) -> None:
    """``close()`` that returns within ``seconds`` whatever the coordinator does (a consumer leaving
    its group waits for it); a client that fails or is stuck closing is abandoned.

    A commit abandoned on another thread (``call_within``) may still wait inside this client: the
    group's shutdown waits for outstanding commits before the handle is destroyed, so ``close()``
    either ends that commit first or stays stuck with it (and is abandoned)."""
    if client is None:
        return
    try:
        call_within(client.close, seconds)
    except (KafkaException, RuntimeError, StuckCall) as exc:
        log.warning("consumer abandoned, its close() failed or hung: %s", exc)
