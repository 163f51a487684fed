"""Topic admin without a broker: the keyless-events warning (accepting keyless events is safe on
a topic of one partition only, and a scorer or archiver given a partition above 0 says so at each
assignment), and a deleted dead-letter topic created again (`recreate_if_deleted`)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic

from core.settings import Settings
from monitoring.metrics import Metrics
from stream import archiver, topics
from stream.consumer import ScoringConsumer
from stream.topics import keyless_events_warning


@pytest.mark.parametrize(
    ("require_key", "assigned", "warns"),
    [
        (False, [0], False),  # one partition (or this process holds only the first): nothing shows more
        (False, [], False),
        (False, [0, 3], True),
        (False, [2], True),  # another process holds 0 and 1
        (True, [0, 1, 2], False),  # keyless events are dead-lettered: safe on any topic
    ],
)
def test_the_warning_needs_keyless_events_accepted_and_a_partition_above_0(
    require_key: bool, assigned: list[int], warns: bool
) -> None:
    warning = keyless_events_warning(Settings(require_event_key=require_key), assigned)
    assert (warning is not None) == warns
    if warns:
        assert f"at least {max(assigned) + 1} partitions" in warning  # type: ignore[operator]
        assert "CHURN_REQUIRE_EVENT_KEY=true" in warning  # type: ignore[operator]


class Committed:
    """A consumer whose coordinator answers the committed offsets: none committed."""

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, -1001) for p in partitions]

    def close(self) -> None:
        pass


def _assign(component: Any, partitions: list[int]) -> None:
    component._on_assign(component.consumer, [TopicPartition("events", p) for p in partitions])


def test_the_archiver_warns_when_given_a_partition_above_0_with_keyless_events_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(archiver, "committing_consumer", lambda *_args, **_kw: Committed())
    worker = archiver.Archiver(Settings(require_event_key=False), tmp_path / "log", metrics=Metrics())
    with caplog.at_level(logging.WARNING, logger=archiver.__name__):
        _assign(worker, [0])
        assert not caplog.records
        _assign(worker, [1])  # the topic gained a partition: the group rebalanced
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "at least 2 partitions" in caplog.records[0].getMessage()


class Partitions:
    """The processor's side of an assignment."""

    def __init__(self) -> None:
        self.changed: list[tuple[list[int], list[int]]] = []

    def partitions_changed(self, assigned: list[int], revoked: list[int]) -> None:
        self.changed.append((assigned, revoked))


def test_the_scorer_warns_when_given_a_partition_above_0_with_keyless_events_accepted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor = Partitions()
    settings = Settings(kafka_bootstrap="127.0.0.1:1", require_event_key=False)  # nothing listens there
    scorer = ScoringConsumer(settings, processor, None, Metrics())  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.WARNING, logger="stream.consumer"):
            _assign(scorer, [0, 5])
        assert processor.changed == [([0, 5], [])]
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "at least 6 partitions" in caplog.records[0].getMessage()
    finally:
        scorer.consumer.close()


# --- a deleted dead-letter topic is created again ---------------------------------------------


class FakeAdmin:
    """An AdminClient whose metadata and creations are scripted: `known` maps a topic name to
    its metadata error code (None: the topic is there); `create_error` fails the creation."""

    def __init__(self, known: dict[str, int | None], create_error: int | None = None, slow_s: float = 0.0) -> None:
        self.known = known
        self.create_error = create_error
        self.slow_s = slow_s
        self.created: list[tuple[str, int]] = []

    def list_topics(self, topic: str, timeout: float) -> Any:
        time.sleep(self.slow_s)
        topics = {
            name: SimpleNamespace(error=None if code is None else KafkaError(code)) for name, code in self.known.items()
        }
        return SimpleNamespace(topics=topics)

    def create_topics(self, new: list[NewTopic], **_: Any) -> dict[str, Future[None]]:
        futures: dict[str, Future[None]] = {}
        for topic in new:
            future: Future[None] = Future()
            if self.create_error is None:
                self.created.append((topic.topic, topic.num_partitions))
                future.set_result(None)
            else:
                future.set_exception(KafkaException(KafkaError(self.create_error)))
            futures[topic.topic] = future
        return futures


class KafkaDown:
    def list_topics(self, topic: str, timeout: float) -> Any:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT))


@pytest.mark.parametrize(
    ("admin", "created", "logged"),
    [
        (FakeAdmin({"events.dlq": None}), [], None),  # there: nothing to do
        (FakeAdmin({}), [("events.dlq", 4)], "created it again"),  # absent from the metadata
        (FakeAdmin({"events.dlq": KafkaError.UNKNOWN_TOPIC_OR_PART}), [("events.dlq", 4)], "created it again"),
        (FakeAdmin({"events.dlq": KafkaError.LEADER_NOT_AVAILABLE}), [], None),  # there, electing: not ours
        (FakeAdmin({}, create_error=KafkaError.TOPIC_ALREADY_EXISTS), [], None),  # another process did it
        (FakeAdmin({}, create_error=KafkaError.POLICY_VIOLATION), [], "could not be created again"),
        (KafkaDown(), [], "could not check"),
    ],
)
def test_a_deleted_topic_is_created_again_and_nothing_else_is(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    admin: Any,
    created: list[Any],
    logged: str | None,
) -> None:
    monkeypatch.setattr(topics, "_admin", lambda *_args, **_kw: admin)
    with caplog.at_level(logging.INFO, logger=topics.__name__):
        result = topics.recreate_if_deleted(Settings(), "events.dlq", 4, threading.Event())
    assert result == bool(created)
    assert getattr(admin, "created", []) == created
    if logged is None:
        assert not caplog.records
    else:
        assert logged in caplog.text
    if created or logged == "could not be created again":
        assert {r.levelno for r in caplog.records} == {logging.WARNING}  # an operator must see these


def test_a_stop_signal_does_not_wait_for_the_topic_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check follows a failed delivery, often a dead Kafka whose metadata request waits out
    its whole timeout: a stop must end the wait at once (invariant 13)."""
    admin = FakeAdmin({}, slow_s=5.0)
    monkeypatch.setattr(topics, "_admin", lambda *_args, **_kw: admin)
    stopping = threading.Event()
    threading.Timer(0.2, stopping.set).start()
    started = time.monotonic()
    assert topics.recreate_if_deleted(Settings(), "events.dlq", 4, stopping) is False
    assert time.monotonic() - started < 1.0
    assert topics.recreate_if_deleted(Settings(), "events.dlq", 4, stopping) is False  # set: not even asked
