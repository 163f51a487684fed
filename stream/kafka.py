"""Kafka clients of the stream processes: consumers that commit their own offsets (the scorer,
the archiver and the benchmark's naive baseline share these settings) and an idempotent producer
that outlives a fatal error."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import Gauge

from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings

log = logging.getLogger(__name__)
# A crashed member's partitions move to the others after this long (the broker's minimum is 6 s).
SESSION_TIMEOUT_MS = 10_000
# How often a wait for acknowledgements looks at its `interrupt` (a stop signal).
ACK_WAIT_SLICE_S = 0.25
# librdkafka fails a message to a topic the broker does not know only once this long has passed
# since the client first named the topic (`topic.metadata.propagation.max.ms`, 30 s by default,
# the time a new topic may take to reach every broker). The scorer names its dead-letter topic at
# its first bad event: if the topic was deleted before, the letter waited out the whole 30 s
# acknowledgement wait before the scorer learned the topic was gone and created it again
# (measured 31-34 s; 3.6-5.4 s with this). A topic slower than this to propagate fails the
# message, and the caller retries its batch as after any failed delivery.
UNKNOWN_TOPIC_AFTER_MS = 5_000


def committing_consumer(settings: Settings, group: str, extra: dict[str, Any] | None = None) -> Consumer:
    """Returns a consumer in `group` that starts at the earliest offset when the group has none
    and never commits by itself (the caller commits after its writes); `extra` overrides."""
    return Consumer(
        kafka_config(
            settings,
            **{
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                **(extra or {}),
            },
        )
    )


def commit_unless_stopped(consumer: Consumer, offsets: list[TopicPartition] | None, stopping: threading.Event) -> bool:
    """Commits `offsets` (None: the consumer's current positions) synchronously and returns True
    once the broker has them, or returns False as soon as `stopping` is set while the commit
    waits (the commit is then abandoned on its thread, and the caller must not use or close
    `consumer` again).

    Why a thread: librdkafka's synchronous commit has no timeout and, while no broker answers,
    waits until one does (measured: more than 60 s after SIGTERM with the broker down), so a stop
    signal would go unheeded for the whole outage. The thread costs about 0.18 ms per commit
    (measured on the 2-core dev VM: its start and the wake-up), one per batch: 0.2 µs per event
    at the live loop's batch of ~900 messages, against ~175 µs of scorer CPU per event there.

    Raises:
        KafkaException: the commit failed, or the broker refused a partition's offset (e.g. a
            rebalance moved the partition, or the connection broke with the request in flight).
    """
    refused: list[KafkaException] = []

    def commit() -> None:
        try:
            # A partition the broker refused comes back with its error set, not raised.
            if offsets is None:
                answered = consumer.commit(asynchronous=False) or []
            else:
                answered = consumer.commit(offsets=offsets, asynchronous=False) or []
            failed = [tp.error for tp in answered if tp.error is not None]
            if failed:
                refused.append(KafkaException(failed[0]))
        except KafkaException as exc:
            refused.append(exc)

    if not run_unless_stopped(commit, stopping, "kafka-commit"):
        return False
    if refused:
        raise refused[0]
    return True


def run_unless_stopped(work: Callable[[], None], stopping: threading.Event, name: str) -> bool:
    """Runs `work` on a thread of its own (named `name`) and returns True once it has ended, or
    False as soon as `stopping` is set while it runs (it is then abandoned: a daemon thread, so
    it never holds the process's exit). For a call to a broker that may not answer and has no
    timeout of its own, or one longer than a stop may wait; `work` hands its result back
    through what it closes over."""
    done = threading.Event()

    def run() -> None:
        try:
            work()
        finally:
            done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    while not done.wait(ACK_WAIT_SLICE_S):
        if stopping.is_set():
            return False
    return True


def report_lag(consumer: Consumer, gauge: Gauge) -> None:
    """Sets `gauge` (labels topic, partition) to the lag of each partition assigned to `consumer`,
    and removes the series of partitions it no longer holds. Best-effort monitoring: never raises.

    The lag is the high watermark of the partition's last fetch response minus the consumer's
    position. The watermark is librdkafka's cached one, with no broker round trip: asking the
    broker cost up to 1 s per partition while Kafka was down, and a stop signal waited for it.
    Before the consumer has read anything of a partition it has no position, and the committed
    offset stands in (it is where the consumer will start): taking the whole partition as lag
    made a consumer restarted on a quiet, fully consumed topic look a partition behind, and the
    lag alert fire. When the group has committed nothing there (a new group), the start is the
    partition's first offset, asked of the broker. A partition whose figures are not known (no
    fetch answered yet, or the coordinator down) keeps its last value. The series of a partition
    a rebalance moved away is removed, or the group's sum would count the partition twice (its
    new owner reports it too).
    """
    try:
        assigned = consumer.assignment()
        positions = consumer.position(assigned)
    except KafkaException:
        return
    starts = {(tp.topic, tp.partition): tp.offset for tp in positions if tp.offset >= 0}
    never_committed: set[tuple[str, int]] = set()
    unpositioned = [tp for tp in positions if tp.offset < 0]
    if unpositioned:
        try:
            committed = consumer.committed(unpositioned, timeout=1)
        except KafkaException as exc:
            log.debug("no committed offsets for the lag: %s", exc)
            committed = []
        for tp in committed:
            if tp.offset >= 0:
                starts[(tp.topic, tp.partition)] = tp.offset
            else:
                never_committed.add((tp.topic, tp.partition))
    for tp in positions:
        key = (tp.topic, tp.partition)
        try:
            if key in starts:
                start = starts[key]
                _, high = consumer.get_watermark_offsets(tp, cached=True)
            elif key in never_committed:  # the consumer will start at the first offset (earliest)
                start, high = consumer.get_watermark_offsets(tp, timeout=1, cached=False)
            else:
                continue
        except KafkaException as exc:
            log.debug("no watermark for %s[%d]: %s", tp.topic, tp.partition, exc)
            continue
        if start >= 0 and high >= 0:
            gauge.labels(tp.topic, str(tp.partition)).set(max(high - start, 0))
    held = {(tp.topic, str(tp.partition)) for tp in assigned}
    for family in gauge.collect():
        for sample in family.samples:
            labels = (sample.labels["topic"], sample.labels["partition"])
            if labels not in held:
                gauge.remove(*labels)


# librdkafka refuses a message larger than `message.max.bytes` (1,000,000 by default; brokers take
# about 1 MiB) for good. A dead letter is its source message plus headers, so one whose source
# was near the limit could never be written, and its batch would be retried forever: one
# oversized event would stall its partition. Above this size its value is cut.
DEAD_LETTER_MAX_VALUE_BYTES = 900_000


def dead_letter(
    value: bytes, headers: list[tuple[str, str | bytes | None]], key: bytes | None = None
) -> dict[str, Any]:
    """Returns the `Producer.produce` arguments of one dead letter: `value` as it came, or its
    first `DEAD_LETTER_MAX_VALUE_BYTES` with a `truncated_from_bytes` header giving its size (the
    source coordinates in `headers` say where the whole message is, for the topic's retention)."""
    if len(value) > DEAD_LETTER_MAX_VALUE_BYTES:
        headers = [*headers, ("truncated_from_bytes", str(len(value)).encode())]
        value = value[:DEAD_LETTER_MAX_VALUE_BYTES]
    return {"value": value, "key": key, "headers": headers}


def is_fatal(error: KafkaError) -> bool:
    """Returns whether `error` leaves its client unusable for good (librdkafka's fatal errors)."""
    return bool(error.fatal()) or error.code() == KafkaError._FATAL


class IdempotentProducer:
    """An idempotent producer (ordered per partition, no duplicates from its own retries) that
    replaces itself after a fatal error, and learns within `UNKNOWN_TOPIC_AFTER_MS` that a topic
    was deleted (its callers create such a topic again).

    librdkafka makes an idempotent producer unusable for good after some errors, e.g. a sequence
    the broker did not expect after a broker restart; from then on every `produce` raises and
    every queued message fails. A new producer gets a new producer id, so the caller's retry
    (the scorer retries its whole batch) can go through instead of failing until a restart.

    `interrupt` (the process's stop signal) ends a wait for acknowledgements early: while Kafka
    is down that wait lasts its whole timeout (30 s), and SIGTERM would go unheeded meanwhile.
    What was not acknowledged is then reported as for a timeout, so the caller does not commit
    its batch, and the batch is replayed after the restart.
    """

    def __init__(
        self,
        config: dict[str, Any],
        factory: Callable[[dict[str, Any]], Any] = Producer,
        interrupt: threading.Event | None = None,
    ) -> None:
        propagation = {"topic.metadata.propagation.max.ms": UNKNOWN_TOPIC_AFTER_MS}
        self.config = {**propagation, **config, "enable.idempotence": True}
        self.factory = factory
        self.producer = factory(self.config)
        self.interrupt = interrupt or threading.Event()
        self.replaced = 0  # how many times a fatal error replaced the producer

    def produce(self, topic: str, **message: Any) -> None:
        """Queues one message (`Producer.produce` keyword arguments).

        Raises:
            ServiceUnavailableError: the producer refused it (a fatal error replaces the producer
                first, so the next attempt uses a new one), or its local queue is full (while no
                broker takes them, each retry of a batch queues its messages again).
        """
        try:
            self.producer.produce(topic, **message)
        except KafkaException as exc:
            self.recover_from([exc.args[0]])
            msg = f"cannot produce to {topic!r}: {exc.args[0]}"
            raise ServiceUnavailableError(msg) from exc
        except BufferError as exc:  # librdkafka's "queue full" is not a KafkaException
            msg = f"cannot produce to {topic!r}: the local queue is full ({exc})"
            raise ServiceUnavailableError(msg) from exc

    def deliver(self, topic: str, messages: Iterable[dict[str, Any]], timeout_s: float, what: str) -> None:
        """Produces each of `messages` (`Producer.produce` keyword arguments) to `topic` and waits
        up to `timeout_s` for every acknowledgement (less once `interrupt` is set); `what` names
        them in the error. What was not yet sent when the wait ends is dropped (`drop_unsent`),
        so the caller's retry does not queue a second copy; what is in flight may still land.

        Raises:
            ServiceUnavailableError: one was refused, failed or not acknowledged in time (a fatal
                error replaces the producer first); the caller's retry may produce them again.
        """
        failures: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Any) -> None:
            if error is not None and error.code() != KafkaError._PURGE_QUEUE:  # dropped unsent: in `left`
                failures.append(error)

        try:
            for message in messages:
                self.produce(topic, on_delivery=delivered, **message)
        finally:
            # Also after a refusal: what was queued is delivered (or failed) before the caller's
            # retry, which may read the topic to learn what is already there.
            left = self.flush(timeout_s)
            if left:
                self.drop_unsent()
        if left or failures:
            self.recover_from(failures)
            stopped = " (stopping)" if left and self.interrupt.is_set() else ""
            msg = f"topic {topic!r} did not acknowledge {left or len(failures)} {what}{stopped}: {failures[:1]}"
            raise ServiceUnavailableError(msg)

    def flush(self, timeout_s: float) -> int:
        """Waits up to `timeout_s` for the queued messages' acknowledgements, or until `interrupt`
        is set; returns how many are still unacknowledged (0: all delivered or failed, see the
        delivery callbacks)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = int(self.producer.flush(max(0.0, min(ACK_WAIT_SLICE_S, deadline - time.monotonic()))))
            if not left or self.interrupt.is_set() or time.monotonic() >= deadline:
                return left

    def drop_unsent(self) -> None:
        """Drops the queued messages not yet sent to a broker (those in flight stay: the broker
        may have written them). Why: librdkafka keeps a message for `message.timeout.ms` (5
        minutes) after a wait gave up on it, so the caller's retry, which produces it again,
        would put a second copy behind the first and both would land once Kafka is back (a tier
        change announced twice, a dead letter once per retry of an outage)."""
        self.producer.purge(in_queue=True, in_flight=False)
        self.producer.poll(0)  # their delivery callbacks (purged) run now, not in a later wait

    def recover_from(self, errors: list[KafkaError]) -> bool:
        """Replaces the producer if any of `errors` (from `produce` or delivery callbacks) is
        fatal, dropping what the old one still queued (it can deliver none of it); returns
        whether it did."""
        fatal = next((e for e in errors if is_fatal(e)), None)
        if fatal is None:
            return False
        log.error("the Kafka producer failed for good (%s): replacing it", fatal)
        old, self.producer = self.producer, self.factory(self.config)
        old.purge()
        self.replaced += 1
        return True
