"""The idempotent producer that replaces itself after a fatal error, and the change log that
relies on it: librdkafka cannot be made to fail for good on demand, so a stand-in producer
raises and fails deliveries the way a fenced idempotent producer does. A stop signal ends a wait
for acknowledgements from a real librdkafka producer whose broker does not answer."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, Gauge

from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import load_settings
from stream.changes import KafkaChangeLog
from stream.kafka import (
    DEAD_LETTER_MAX_VALUE_BYTES,
    UNKNOWN_TOPIC_AFTER_MS,
    IdempotentProducer,
    commit_unless_stopped,
    dead_letter,
    report_lag,
)
from tests.support import tier_change

FATAL = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence desynchronization", fatal=True)
TIMED_OUT = KafkaError(KafkaError._MSG_TIMED_OUT, "message timed out")


class _Producer:
    """Queues messages; `refuse` makes `produce` raise it, `fail_deliveries` fails every queued
    message with it at the next flush (delivery callbacks run there, as in librdkafka). While
    `unanswered`, a flush sends nothing and returns how many it holds (a broker that does not
    answer); `in_flight` holds sent messages awaiting their acknowledgement, which a purge of
    the queue alone keeps (as librdkafka does)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.refuse: KafkaError | None = None
        self.fail_deliveries: KafkaError | None = None
        self.unanswered = False
        self.queued: list[tuple[str, dict[str, Any]]] = []
        self.in_flight: list[tuple[str, dict[str, Any]]] = []
        self.delivered: list[tuple[str, dict[str, Any]]] = []
        self.purged = False

    def produce(self, topic: str, **message: Any) -> None:
        if self.refuse is not None:
            raise KafkaException(self.refuse)
        self.queued.append((topic, message))

    def flush(self, _timeout: float) -> int:
        if self.unanswered:
            return len(self)
        for topic, message in self.in_flight + self.queued:
            if callback := message.get("on_delivery"):
                callback(self.fail_deliveries, None)
            if self.fail_deliveries is None:
                self.delivered.append((topic, message))
        self.queued, self.in_flight = [], []
        return 0

    def send_without_answer(self) -> None:
        """Moves the queue in flight: sent, not yet acknowledged."""
        self.in_flight, self.queued = self.in_flight + self.queued, []

    def purge(self, in_queue: bool = True, in_flight: bool = True) -> None:
        self.purged = True
        dropped = (self.queued if in_queue else []) + (self.in_flight if in_flight else [])
        for _, message in dropped:
            if callback := message.get("on_delivery"):
                callback(KafkaError(KafkaError._PURGE_QUEUE), None)
        self.queued = [] if in_queue else self.queued
        self.in_flight = [] if in_flight else self.in_flight

    def poll(self, _timeout: float) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.queued) + len(self.in_flight)


def _producer() -> tuple[IdempotentProducer, list[_Producer]]:
    made: list[_Producer] = []

    def factory(config: dict[str, Any]) -> _Producer:
        made.append(_Producer(config))
        return made[-1]

    return IdempotentProducer({"client.id": "stand-in"}, factory), made


def test_a_full_local_queue_is_a_service_unavailable_error_not_a_crash() -> None:
    """A real librdkafka producer whose broker does not answer: its queue fills (as a batch's
    retries fill it during an outage) and it refuses with BufferError, which the scorer's retry
    must see as an outage, not an unknown exception that ends the process."""
    settings = load_settings(kafka_bootstrap="127.0.0.1:1")  # nothing listens there
    producer = IdempotentProducer(kafka_config(settings, **{"queue.buffering.max.messages": 2}))
    with pytest.raises(ServiceUnavailableError, match="the local queue is full"):
        producer.deliver("t", [{"value": b"x"}] * 3, 0.1, "message(s)")


def test_a_fatal_refusal_replaces_the_producer_and_the_next_attempt_goes_through() -> None:
    producer, made = _producer()
    assert made[0].config["enable.idempotence"] is True
    made[0].refuse = FATAL
    with pytest.raises(ServiceUnavailableError, match="sequence desynchronization"):
        producer.produce("t", value=b"1")
    assert len(made) == 2
    # Quick to learn that a topic was deleted (the new producer is made alike, below).
    assert made[0].config["topic.metadata.propagation.max.ms"] == UNKNOWN_TOPIC_AFTER_MS
    assert made[0].purged
    assert made[1].config == made[0].config
    producer.produce("t", value=b"1")
    assert producer.flush(1) == 0
    assert made[1].delivered == [("t", {"value": b"1"})]
    assert producer.replaced == 1


def test_only_a_fatal_error_replaces_it() -> None:
    producer, made = _producer()
    made[0].refuse = KafkaError(KafkaError._UNKNOWN_PARTITION, "no such partition")
    with pytest.raises(ServiceUnavailableError):
        producer.produce("t", value=b"1")
    assert not producer.recover_from([TIMED_OUT])
    assert len(made) == 1
    assert producer.recover_from([TIMED_OUT, FATAL])
    assert len(made) == 2


def test_the_change_log_fails_the_batch_on_a_fatal_delivery_and_its_retry_publishes_on_a_new_producer() -> None:
    log = KafkaChangeLog(load_settings(kafka_bootstrap="127.0.0.1:1"), "changes", timeout_s=1)
    log.producer, made = _producer()
    checks: list[None] = []

    def topic_is_there() -> bool:
        checks.append(None)
        return False

    log.recreate_if_deleted = topic_is_there
    made[0].fail_deliveries = FATAL
    with pytest.raises(ServiceUnavailableError, match="did not acknowledge 1 change"):
        log.publish([tier_change("u1")])
    assert len(made) == 2
    assert len(checks) == 1  # a failed publish asks whether the topic was deleted, once
    log.publish([tier_change("u1")])  # the scorer's retry of the batch
    assert [m["key"] for _, m in made[1].delivered] == [b"u1"]
    log.reader.close()


def _log_with_empty_tail(monkeypatch: pytest.MonkeyPatch) -> tuple[KafkaChangeLog, list[_Producer]]:
    """Returns a change log on a stand-in producer whose topic's tail reads as empty."""
    log = KafkaChangeLog(load_settings(kafka_bootstrap="127.0.0.1:1"), "changes", timeout_s=0.1)
    log.reader.close()
    log.producer, made = _producer()
    monkeypatch.setattr(log, "recreate_if_deleted", lambda: False)  # the topic is there
    monkeypatch.setattr(log, "_ends", lambda _tp: (0, 0))
    monkeypatch.setattr(log, "_read", lambda _partition, _start, _end: [])
    return log, made


def test_a_publish_that_timed_out_leaves_no_copy_queued_behind_its_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker takes nothing for the whole wait, then comes back: the batch's retry reads the
    tail (empty) and publishes the change again, which must land once (before, the first copy
    waited in librdkafka's queue for 5 minutes and landed too: a change announced twice)."""
    log, made = _log_with_empty_tail(monkeypatch)
    made[0].unanswered = True
    with pytest.raises(ServiceUnavailableError, match="did not acknowledge 1 change"):
        log.publish([tier_change("u1")])
    made[0].unanswered = False  # Kafka is back
    assert log.published(0, 0) == []
    log.publish([tier_change("u1")])
    assert [m["key"] for _, m in made[0].delivered] == [b"u1"]


def test_the_tail_is_read_only_once_an_earlier_publish_in_flight_has_landed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes sent but not yet acknowledged may still land: a tail read before then would miss
    them and the retry would announce them again, so the read waits, and refuses at its timeout."""
    log, made = _log_with_empty_tail(monkeypatch)
    made[0].produce("changes", value=b"{}")
    made[0].send_without_answer()
    made[0].unanswered = True
    with pytest.raises(ServiceUnavailableError, match=r"1 change.* still in flight"):
        log.published(0, 0)
    made[0].unanswered = False
    assert log.published(0, 0) == []  # landed: the tail is read


def test_a_wait_that_ends_unacknowledged_drops_what_was_not_sent() -> None:
    """A real librdkafka producer whose broker does not answer: after the wait nothing of the
    deliver stays queued (librdkafka would keep it for `message.timeout.ms`, 5 minutes)."""
    producer = IdempotentProducer(kafka_config(load_settings(kafka_bootstrap="127.0.0.1:1")))
    with pytest.raises(ServiceUnavailableError, match=r"did not acknowledge 2 dead letter\(s\): \[\]"):
        producer.deliver("events.dlq", [{"value": b"a"}, {"value": b"b"}], 0.2, "dead letter(s)")
    assert len(producer.producer) == 0  # librdkafka counts what it still holds


def test_the_dead_letter_of_an_event_near_the_size_limit_can_be_written() -> None:
    """A 999,500-byte event passes the broker's limit and is dead-lettered for its size; its dead
    letter (the event plus headers) was over librdkafka's 1,000,000 bytes, refused for good at
    every retry of its batch: the partition stalled. Cut, it is accepted (here it only waits for
    a broker that does not answer); the header keeps its size."""
    producer = IdempotentProducer(kafka_config(load_settings(kafka_bootstrap="127.0.0.1:1")))
    event = b"x" * 999_500
    headers: list[tuple[str, str | bytes | None]] = [("reason", b"r" * 1024), ("source_offset", b"7")]
    with pytest.raises(ServiceUnavailableError, match="MSG_SIZE_TOO_LARGE"):  # as it came
        producer.deliver("events.dlq", [{"value": event, "headers": headers}], 0.1, "dead letter(s)")
    with pytest.raises(ServiceUnavailableError, match="did not acknowledge 1 dead letter"):
        producer.deliver("events.dlq", [dead_letter(event, headers)], 0.1, "dead letter(s)")
    letter = dead_letter(event, headers, b"k")
    assert letter["value"] == event[:DEAD_LETTER_MAX_VALUE_BYTES]
    assert letter["headers"] == [*headers, ("truncated_from_bytes", b"999500")]
    assert letter["key"] == b"k"
    assert dead_letter(b"{}", headers) == {"value": b"{}", "key": None, "headers": headers}


def _seconds_to_stop(call: Callable[[KafkaChangeLog], object], refusal: str) -> float:
    """Runs `call` on a change log whose broker does not answer (nothing listens on port 1),
    with a 30 s timeout and a stop signal 0.5 s in; checks that it raises ServiceUnavailableError
    matching `refusal` and returns how long it took."""
    stop = threading.Event()
    log = KafkaChangeLog(load_settings(kafka_bootstrap="127.0.0.1:1"), "changes", timeout_s=30, interrupt=stop)
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailableError, match=refusal):
            call(log)
        return time.monotonic() - started
    finally:
        log.producer.producer.purge()
        log.reader.close()


def test_a_stop_signal_ends_a_publish_waiting_for_a_broker_that_does_not_answer() -> None:
    # librdkafka queues the change and no acknowledgement ever comes.
    waited = _seconds_to_stop(
        lambda log: log.publish([tier_change("u1")]), r"did not acknowledge 1 change\(s\) \(stopping\)"
    )
    assert 0.5 <= waited < 10  # after the signal, long before the 30 s timeout


def test_a_stop_signal_ends_a_read_of_the_published_tail_while_no_broker_answers() -> None:
    # The scorer reads the tail when it retries a batch after an outage: with Kafka still down,
    # each metadata or watermark request would wait out its whole timeout.
    waited = _seconds_to_stop(lambda log: log.published(0, 0), r"cannot read the ends of changes\[0\] \(stopping\)")
    assert 0.5 <= waited < 5  # within a try of the signal, long before the 30 s timeout


def test_without_a_stop_signal_a_read_of_the_tail_asks_again_until_its_timeout() -> None:
    log = KafkaChangeLog(load_settings(kafka_bootstrap="127.0.0.1:1"), "changes", timeout_s=2.5)
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailableError, match=r"cannot read the ends of changes\[3\]: "):
            log.published(3, 0)
        waited = time.monotonic() - started
    finally:
        log.reader.close()
    assert waited >= 2.5


def test_without_a_stop_signal_the_wait_lasts_its_timeout() -> None:
    producer = IdempotentProducer(kafka_config(load_settings(kafka_bootstrap="127.0.0.1:1")))
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailableError, match=r"did not acknowledge 1 event\(s\): "):
            producer.deliver("events", [{"value": b"{}"}], 1.0, "event(s)")
        waited = time.monotonic() - started
    finally:
        producer.producer.purge()
    assert waited >= 1.0


# A process that stops while its commit waits for a broker that does not answer (nothing
# listens on port 1): librdkafka's synchronous commit has no timeout of its own.
ABANDON_A_COMMIT = """
import threading
from confluent_kafka import TopicPartition
from core.settings import load_settings
from stream.kafka import commit_unless_stopped, committing_consumer
consumer = committing_consumer(load_settings(kafka_bootstrap="127.0.0.1:1"), "g")
stop = threading.Event()
threading.Timer(0.5, stop.set).start()
print(commit_unless_stopped(consumer, [TopicPartition("t", 0, 5)], stop))
"""


def test_a_stop_signal_ends_a_commit_waiting_for_a_broker_that_does_not_answer_and_the_process_exits() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", ABANDON_A_COMMIT], capture_output=True, text=True, timeout=60)
    waited = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"  # abandoned, not committed
    assert waited < 20  # the interpreter's start and imports, then 0.5 s: not the broker's silence


class AnsweringConsumer:
    """A consumer whose commit answers at once: with `refusal`, by raising it; with
    `partition_error`, by returning the partitions with that error set (as librdkafka reports a
    partition the broker refused)."""

    def __init__(self, refusal: KafkaException | None = None, partition_error: KafkaError | None = None) -> None:
        self.refusal = refusal
        self.partition_error = partition_error
        self.committed: list[TopicPartition] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[Any]:
        assert not asynchronous
        if self.refusal is not None:
            raise self.refusal
        if self.partition_error is None:
            self.committed.extend(offsets)
        return [SimpleNamespace(topic=tp.topic, partition=tp.partition, error=self.partition_error) for tp in offsets]


def test_a_commit_the_broker_answers_returns_true_or_raises_its_refusal_of_any_partition() -> None:
    offsets = [TopicPartition("t", 0, 5)]
    answering = AnsweringConsumer()
    assert commit_unless_stopped(answering, offsets, threading.Event())  # type: ignore[arg-type]
    assert answering.committed == offsets
    refusal = KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION, "rebalanced"))
    with pytest.raises(KafkaException, match="rebalanced"):
        commit_unless_stopped(AnsweringConsumer(refusal), offsets, threading.Event())  # type: ignore[arg-type]
    broken = AnsweringConsumer(partition_error=KafkaError(KafkaError._TRANSPORT, "broker went away"))
    with pytest.raises(KafkaException, match="broker went away"):
        commit_unless_stopped(broken, offsets, threading.Event())  # type: ignore[arg-type]


class LagConsumer:
    """A consumer holding partitions 0-3 of `t`: it has read up to offset 5 of partition 1 only;
    the group committed 10 (the end) of partition 0, 4 of partition 2 and nothing of partition 3.
    It has cached the watermarks of partitions 0 and 1 from fetch responses; the broker is down
    (`asked_broker`: the partitions whose watermarks were asked of it)."""

    def __init__(self) -> None:
        self.asked_broker: list[int] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("t", p) for p in (0, 1, 2, 3)]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("t", tp.partition, 5 if tp.partition == 1 else OFFSET_INVALID) for tp in partitions]

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        committed = {0: 10, 2: 4}
        return [TopicPartition("t", tp.partition, committed.get(tp.partition, OFFSET_INVALID)) for tp in partitions]

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = 0, cached: bool = False
    ) -> tuple[int, int]:
        if not cached:
            self.asked_broker.append(partition.partition)
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return {0: (0, 10), 1: (0, 8)}.get(partition.partition, (OFFSET_INVALID, OFFSET_INVALID))


class LagConsumerCoordinatorDown(LagConsumer):
    """The same, with the group's coordinator down too: the committed offsets are unknown."""

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT))


def _lags(gauge: Gauge) -> dict[str, float]:
    return {sample.labels["partition"]: sample.value for family in gauge.collect() for sample in family.samples}


def test_the_lag_counts_from_the_committed_offset_before_the_first_read_and_drops_partitions_moved_away() -> None:
    gauge = Gauge("lag", "lag", ["topic", "partition"], registry=CollectorRegistry())
    gauge.labels("t", "2").set(7)  # its figures are unknown this time: it keeps its value
    gauge.labels("t", "4").set(4)  # a rebalance gave partition 4 to another consumer
    consumer = LagConsumer()
    report_lag(cast(Any, consumer), gauge)
    assert _lags(gauge) == {"0": 0, "1": 3, "2": 7}
    assert consumer.asked_broker == [3]  # only where the group committed nothing: it starts at the first offset


def test_while_the_coordinator_is_down_the_lag_asks_no_broker() -> None:
    gauge = Gauge("lag", "lag", ["topic", "partition"], registry=CollectorRegistry())
    consumer = LagConsumerCoordinatorDown()
    report_lag(cast(Any, consumer), gauge)
    assert _lags(gauge) == {"1": 3}
    assert consumer.asked_broker == []  # each ask would wait up to 1 s
