"""The keyless-events warning: accepting keyless events is safe on a topic of one partition only,
and a scorer or archiver that is given a partition above 0 says so at each assignment."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from core.settings import Settings
from monitoring.metrics import Metrics
from stream import archiver
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
