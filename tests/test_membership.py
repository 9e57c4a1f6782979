"""Static group membership: identities, per-host ordinals, the one consumer-config builder."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from workers import membership
from workers.config import Settings
from workers.errors import KappaError


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KAPPA_INSTANCE_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv(membership.INSTANCE_ENV, membership.AUTO)  # static membership is opt-in
    monkeypatch.delenv(membership.PROTOCOL_ENV, raising=False)
    return tmp_path


def test_default_ids_are_per_host_role_and_ordinal_and_a_dead_slot_is_reused() -> None:
    host = socket.gethostname()
    first, second = membership.resolve("archiver", "g"), membership.resolve("archiver", "g")
    other_role, other_group = membership.resolve("processor", "g"), membership.resolve("archiver", "h")
    try:
        assert first.instance_id == f"kappa-archiver-{host}-0" and second.instance_id == f"kappa-archiver-{host}-1"
        assert other_role.instance_id == f"kappa-processor-{host}-0"
        assert other_group.instance_id == f"kappa-archiver-{host}-0"
        first.release()
        again = membership.resolve("archiver", "g")
        assert again.instance_id == f"kappa-archiver-{host}-0"  # a restart takes the freed slot
        again.release()
    finally:
        for held in (first, second, other_role, other_group):
            held.release()


def test_a_killed_process_frees_its_slot(lock_dir: Path) -> None:
    """The kernel drops a dead process's flock: the restarted worker gets the same identity."""
    code = "from workers import membership; import time; held = membership.resolve('archiver', 'g'); " \
           "print(held.instance_id, flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip().endswith("-0")
        taken = membership.resolve("archiver", "g")
        assert taken.instance_id.endswith("-1")  # type: ignore[union-attr]
        taken.release()
        child.kill()
        child.wait(10)
        restarted = membership.resolve("archiver", "g")
        assert restarted.instance_id.endswith("-0")  # type: ignore[union-attr]
        restarted.release()
    finally:
        child.kill()


def test_flag_beats_environment_and_none_means_dynamic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(membership.INSTANCE_ENV, "from-env")
    monkeypatch.setenv(membership.PROTOCOL_ENV, "consumer")
    assert membership.resolve("archiver", "g").instance_id == "from-env"
    assert membership.resolve("archiver", "g").protocol == "consumer"
    chosen = membership.resolve("archiver", "g", instance="from-flag", protocol="classic")
    assert (chosen.instance_id, chosen.protocol) == ("from-flag", "classic")
    assert membership.resolve("archiver", "g", instance="none").instance_id is None


@pytest.mark.parametrize(("instance", "protocol", "message"), [
    ("a b", None, "may only use letters"),
    (None, "eager", "must be one of classic, consumer"),
])
def test_bad_values_are_one_clear_line(instance: str | None, protocol: str | None, message: str) -> None:
    with pytest.raises(KappaError, match=message) as error:
        membership.resolve("archiver", "g", instance=instance, protocol=protocol)
    assert "\n" not in str(error.value)


def test_the_consumer_protocol_config_leaves_out_what_librdkafka_refuses(settings: Settings) -> None:
    """KIP-848 moves session timeout, heartbeat and assignor to the broker: librdkafka refuses them."""
    with_extra = Settings(settings.bootstrap_servers, kafka_extra={"session.timeout.ms": "30000"})
    for protocol in membership.PROTOCOLS:
        member = membership.Membership(protocol, "kappa-test-0")
        config = membership.consumer_config(with_extra, member, group="g", session_timeout_ms=20_000)
        assert config["group.instance.id"] == "kappa-test-0" and config["group.protocol"] == protocol
        assert (protocol == "classic") == all(key in config for key in membership.CLASSIC_ONLY)
        Consumer(config).close()  # librdkafka accepts it


@pytest.mark.parametrize("command", [["archiver", "--until-end"], ["processor", "-p", "orders", "-v", "2"]])
@pytest.mark.parametrize(("option", "message"), [
    (["--group-protocol", "eager"], "must be one of classic, consumer"),
    (["--instance-id", "a/b"], "may only use letters"),
    (["--group-protocol="], "must be one of classic, consumer"),  # empty is not "the default"
    (["--instance-id="], "may only use letters"),
])
def test_the_clis_refuse_bad_membership_values_before_touching_kafka(
    command: list[str], option: list[str], message: str
) -> None:
    run = subprocess.run([sys.executable, "-m", "workers.cli", *command, *option, "--topic", "no-such-topic-xyz"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert message in run.stderr.strip().splitlines()[-1] and "no-such-topic" not in run.stderr


def test_a_self_fence_rejoins_a_few_times_then_stays_fatal() -> None:
    """The budget behind the processor's rejoin: what librdkafka reports for a fenced static member
    (the code, the fatal error naming it from consume(), a bare _FATAL from later calls of a static
    member) counts; anything else never does; after ``limit`` within the window it stays fatal."""
    from confluent_kafka import KafkaError

    fenced = KafkaError(KafkaError.FENCED_INSTANCE_ID)
    from_consume = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other consumer "
                              "with same group.instance.id", fatal=True)
    bare = KafkaError(KafkaError._FATAL, "Local: Fatal error", fatal=True)
    budget = membership.SelfFenceBudget(limit=3, window_s=300)
    assert not budget.allows(bare, 0.0)  # a dynamic member has no static identity to be fenced
    assert not budget.allows(KafkaError(KafkaError._TRANSPORT), 0.0, static=True)
    assert not budget.allows(ValueError("not Kafka"), 0.0, static=True)
    reports = ((fenced, 1.0), (from_consume, 2.0), (bare, 3.0))
    assert [budget.allows(error, at, static=True) for error, at in reports] == [True] * 3
    assert not budget.allows(fenced, 4.0, static=True), "a fourth fence within the window is a real duplicate id"
    assert budget.allows(fenced, 302.0, static=True), "the window slides: an old fence no longer counts"


def test_a_coordinator_that_does_not_answer_rejoins_a_few_times_then_propagates() -> None:
    """The budget behind new clients for a stuck coordinator connection: a transient error that outlived
    its retries counts (a timed-out committed()); a doomed transaction, a fatal error or anything not
    Kafka's never does; after ``limit`` within the window the error propagates."""
    from confluent_kafka import KafkaError

    budget = membership.UnansweredBudget(limit=2, window_s=600)
    assert not budget.allows(KafkaError(KafkaError._TIMED_OUT, txn_requires_abort=True), 0.0)
    assert not budget.allows(KafkaError(KafkaError._FATAL, fatal=True), 0.0)
    assert not budget.allows(TimeoutError("not Kafka"), 0.0)
    timed_out = KafkaError(KafkaError._TIMED_OUT, "Failed to get committed offsets: Local: Timed out")
    assert [budget.allows(timed_out, at) for at in (1.0, 2.0, 3.0)] == [True, True, False]
    assert budget.allows(timed_out, 602.0), "the window slides"
    assert membership.rejoin_cause(timed_out) == "did not answer in time"
    assert membership.rejoin_cause(KafkaError(KafkaError.FENCED_INSTANCE_ID)) == "fenced this member"


def test_two_processors_given_one_instance_id_end_with_the_fence_error(settings: Settings, topic_factory) -> None:
    """A real duplicate id (real broker): the two fence each other back and forth, so the rejoin budget
    runs out and a processor exits with the fence error instead of rejoining forever."""
    topic = topic_factory("dup-id", 1)
    command = [sys.executable, "-m", "workers.cli", "processor", "-p", "orders", "-v", "1", "--topic", topic,
               "--group", f"{topic}-g", "--instance-id", f"{topic}-same", "--start", "earliest", "--progress", "log"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    try:
        deadline = time.monotonic() + 150
        while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        ended = [p for p in processes if p.poll() is not None]
        assert ended, "both still run after 150 s: the duplicate id is rejoined forever"
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
            process.wait(60)
    output = ended[0].stdout.read() if ended[0].stdout else ""
    assert ended[0].returncode != 0 and "group.instance.id" in output.splitlines()[-1], output[-2000:]
    rejoined = output.count("fenced this member")
    assert 1 <= rejoined <= membership.SelfFenceBudget().limit, output[-2000:]
