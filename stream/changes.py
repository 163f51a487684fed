"""Tier-change events: the scorer announces on Kafka (`risk.changes`, key = user id) every change
of a user's risk tier, so a CRM acts on changes instead of polling every user.

Exactly one event per change, whatever crashes. The scorer publishes a batch's changes (and
waits for the broker's acknowledgement) before it saves the user states, which carry the tier
last announced together with the applied offsets. A change is published to the partition of
the event that caused it, and carries that event's offset (`source_offset`): after a crash,
the events the saved states do not reflect (offsets >= the saved applied offset of the
partition) are replayed, and the changes published for them before the crash are exactly the
tail of that partition of `risk.changes` with `source_offset` >= the saved applied offset. The
processor reads that tail (`ChangeLog.published`) and announces a change only when the new tier
differs from the tier last announced for the user, there or in the saved state, and not for an
event before the user's latest published one (a replay cut into other batches scores the user
at other events): a replayed batch publishes nothing twice, and what it announces continues
each user's chain of tiers, whatever crashes follow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from core.errors import ConfigError, ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings
from stream.kafka import IdempotentProducer
from stream.topics import recreate_if_deleted

log = logging.getLogger(__name__)
# How long one metadata or watermark request of the tail reader may wait before it is asked again
# (the stop signal is looked at between tries).
READ_TRY_S = 1.0


class ChangeReason(msgspec.Struct, frozen=True):
    """One feature's part in the new score: its value and signed impact on the log-odds."""

    feature: str
    value: float | None
    impact: float


class TierChange(msgspec.Struct, frozen=True):
    """One change of a user's risk tier (`old_tier` None: the user's first score).

    `event_time_ms` is the event time of the user's latest event (the score is as of it);
    `source_partition`/`source_offset` are that event's Kafka position (the change is published
    to the same partition of the changes topic)."""

    user_id: str
    old_tier: str | None
    new_tier: str
    churn_probability: float
    reasons: list[ChangeReason]
    model_name: str
    model_version: str
    event_time_ms: int
    prediction_id: str
    source_partition: int
    source_offset: int


ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(TierChange)


class ChangeLog(Protocol):
    """Where tier changes are published, and what was published for not-yet-saved events."""

    def published(self, partition: int, since_offset: int) -> list[TierChange]:
        """Returns, in publication order, the changes published for events of `partition` at or
        after `since_offset`; raises ServiceUnavailableError."""
        ...

    def publish(self, changes: Sequence[TierChange]) -> None:
        """Publishes the changes, each to its source partition, in order; returns once every one
        is acknowledged. Raises ServiceUnavailableError (some may have been published)."""
        ...


class InMemoryChangeLog:
    """A ChangeLog in lists (unit tests); `fail_after` publishes that many, then raises once."""

    def __init__(self) -> None:
        self.partitions: dict[int, list[TierChange]] = {}
        self.fail_after: int | None = None

    def published(self, partition: int, since_offset: int) -> list[TierChange]:
        """See `ChangeLog.published`."""
        return [c for c in self.partitions.get(partition, []) if c.source_offset >= since_offset]

    def publish(self, changes: Sequence[TierChange]) -> None:
        """See `ChangeLog.publish`."""
        for change in changes:
            if self.fail_after is not None:
                if self.fail_after == 0:
                    self.fail_after = None
                    msg = "changes topic unavailable (test)"
                    raise ServiceUnavailableError(msg)
                self.fail_after -= 1
            self.partitions.setdefault(change.source_partition, []).append(change)

    def all(self) -> list[TierChange]:
        """Returns every published change, partition by partition."""
        return [c for p in sorted(self.partitions) for c in self.partitions[p]]


def ensure_changes_topic(settings: Settings, timeout: float = 10.0) -> None:
    """Creates `settings.tier_changes_topic` with as many partitions as the events topic (a change
    goes to the partition of the event that caused it), or adds partitions to an existing one
    that has fewer; and its dead-letter topic `<name>.dlq` (for `stream.actions`).

    Raises:
        ServiceUnavailableError: the broker cannot be reached or refused.
        ConfigError: the events topic does not exist.
    """
    admin = AdminClient(kafka_config(settings, log_level=0))
    try:
        topics = admin.list_topics(timeout=timeout).topics
        events = topics.get(settings.events_topic)
        if events is None or events.error is not None:
            msg = f"events topic {settings.events_topic!r} does not exist (CHURN_EVENTS_TOPIC)"
            raise ConfigError(msg)
        wanted = len(events.partitions)
        name, dlq = settings.tier_changes_topic, f"{settings.tier_changes_topic}.dlq"
        existing = topics.get(name)
        futures: dict[str, Any] = {}
        if existing is None or existing.error is not None:
            futures |= admin.create_topics([NewTopic(name, num_partitions=wanted)])
        elif len(existing.partitions) < wanted:
            futures |= admin.create_partitions([NewPartitions(name, wanted)])
        if dlq not in topics:
            futures |= admin.create_topics([NewTopic(dlq, num_partitions=1)])
        for future in futures.values():
            try:
                future.result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    except KafkaException as exc:
        msg = f"could not prepare topic {settings.tier_changes_topic!r} on {settings.bootstrap_servers}: {exc.args[0]}"
        raise ServiceUnavailableError(msg) from exc


class KafkaChangeLog:
    """Tier changes on a Kafka topic: an idempotent producer (ordered per partition, no
    duplicates from its own retries) and a reader of a partition's tail."""

    def __init__(
        self, settings: Settings, topic: str, timeout_s: float = 30.0, interrupt: threading.Event | None = None
    ) -> None:
        """`interrupt` (the process's stop signal) ends a publish's wait for acknowledgements
        early (see `IdempotentProducer`), and a read of the topic's tail (`published`)."""
        self.topic = topic
        self.timeout_s = timeout_s
        self.interrupt = interrupt or threading.Event()
        self.producer = IdempotentProducer(kafka_config(settings, **{"linger.ms": 5}), interrupt=self.interrupt)
        # Called when changes were not delivered: the topic may have been deleted while this ran;
        # brokers here never create one, so every publish would fail until a restart (which
        # creates it: `ensure_changes_topic`). Created again with the events topic's configured
        # partitions (a change goes to its event's partition), and the batch's retry publishes.
        self.recreate_if_deleted: Callable[[], bool] = partial(
            recreate_if_deleted, settings, topic, settings.topic_partitions, self.interrupt
        )
        # The reader reads bounded ranges, one partition after another: a fetch the broker holds
        # for the default 500 ms (waiting for data that is not coming) delayed each next range.
        self.reader = Consumer(
            kafka_config(
                settings,
                **{"group.id": f"{topic}-tail-reader", "enable.auto.commit": False, "fetch.wait.max.ms": 10},
            )
        )

    def publish(self, changes: Sequence[TierChange]) -> None:
        """See `ChangeLog.publish`."""
        if not changes:
            return
        messages = (
            {"value": ENCODER.encode(c), "key": c.user_id.encode(), "partition": c.source_partition} for c in changes
        )
        try:
            self.producer.deliver(self.topic, messages, self.timeout_s, "change(s)")
        except ServiceUnavailableError:
            self.recreate_if_deleted()  # logs a WARNING when it created the topic
            raise

    def published(self, partition: int, since_offset: int) -> list[TierChange]:
        """See `ChangeLog.published`: reads the partition backwards in growing windows until a
        change older than `since_offset` (or the start) is reached, since every change published
        after the states holding `since_offset` were saved comes after all earlier ones.

        Raises:
            ServiceUnavailableError: the ends cannot be read, or changes of an earlier publish
                are still in flight after `timeout_s` (read before they land, the tail would
                miss them and the retry would announce them again).
        """
        in_flight = self.producer.flush(self.timeout_s)
        if in_flight:
            msg = f"{in_flight} change(s) published to {self.topic!r} earlier are still in flight: the tail waits"
            raise ServiceUnavailableError(msg)
        low, high = self._ends(TopicPartition(self.topic, partition))
        window = 256
        while True:
            start = max(low, high - window)
            changes = self._read(partition, start, high)
            if start == low or (changes and changes[0].source_offset < since_offset):
                return [c for c in changes if c.source_offset >= since_offset]
            window *= 8

    def _ends(self, tp: TopicPartition) -> tuple[int, int]:
        """Returns the first and next offsets of partition `tp`, asking for at most `READ_TRY_S`
        at a time until the broker answers, `timeout_s` has passed or `interrupt` is set.

        Why in tries: while Kafka is down each request waits out its whole timeout, and a stop
        signal went unheeded for twice 30 s (the scorer reads the tail when it retries a batch
        after an outage, so a SIGTERM in an outage often lands here).

        Raises:
            ServiceUnavailableError: no answer within `timeout_s`, or a stop signal came first.
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                # The reader sits idle between outages, so the leaders it cached may be brokers
                # that died since: asked there, the ends waited out the whole timeout (twice 30 s
                # in a cluster test where the partition's old leader had been SIGKILLed). A
                # metadata request for the topic first brings the cache up to date.
                self.reader.list_topics(self.topic, timeout=READ_TRY_S)
                low, high = self.reader.get_watermark_offsets(tp, timeout=READ_TRY_S)
                return int(low), int(high)
            except KafkaException as exc:
                if self.interrupt.is_set() or time.monotonic() >= deadline:
                    stopped = " (stopping)" if self.interrupt.is_set() else ""
                    msg = f"cannot read the ends of {self.topic}[{tp.partition}]{stopped}: {exc.args[0]}"
                    raise ServiceUnavailableError(msg) from exc

    def _read(self, partition: int, start: int, end: int) -> list[TierChange]:
        """Returns the changes at offsets [start, end) of a partition.

        Raises:
            ServiceUnavailableError: the range was not read within `timeout_s`, a stop signal
                came first, or the broker reported an error.
        """
        if start >= end:
            return []
        self.reader.assign([TopicPartition(self.topic, partition, start)])
        out: list[TierChange] = []
        deadline = time.monotonic() + self.timeout_s
        position = start
        try:
            while position < end:
                if self.interrupt.is_set():
                    msg = f"reading {self.topic}[{partition}] {start}..{end}: stopped at {position}"
                    raise ServiceUnavailableError(msg)
                if time.monotonic() > deadline:
                    msg = f"reading {self.topic}[{partition}] {start}..{end} took over {self.timeout_s:.0f}s"
                    raise ServiceUnavailableError(msg)
                # Ask for exactly what is left: librdkafka's `consume` waits out its whole timeout
                # unless that many messages arrive (asking for 1,000 cost 1 s per partition read).
                for message in self.reader.consume(min(end - position, 10_000), 1.0):
                    error, at = message.error(), message.offset()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            continue
                        msg = f"reading {self.topic}[{partition}]: {error}"
                        raise ServiceUnavailableError(msg)
                    if at is None:
                        continue
                    position = at + 1
                    if at < end:
                        change = _decoded(message.value() or b"", f"{self.topic}[{partition}]@{at}")
                        if change is not None:
                            out.append(change)
        finally:
            self.reader.unassign()
        return out

    def close(self) -> None:
        """Flushes the producer and closes the reader."""
        self.producer.flush(self.timeout_s)
        self.reader.close()


def _decoded(value: bytes, where: str) -> TierChange | None:
    """Returns the change `value` holds, or None (logged) for a message that is not one: another
    producer's message on the topic is no change this scorer published, and failing on it made
    every start, rebalance and outage retry fail again (a crash loop)."""
    try:
        return DECODER.decode(value)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        log.warning("%s is not a tier change (%s): not one this scorer published; skipped", where, exc)
        return None
