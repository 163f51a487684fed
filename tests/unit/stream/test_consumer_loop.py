"""The scorer loop's batching policy: a loop that is behind never waits for a batch."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from events.schema import parse_batch
from stream.consumer import LoopConfig, ScoringConsumer, dlq_headers, header_text
from tests.support import random_events


class RecordingConsumer:
    """Answers `consume` from a script of batches and records each call's timeout."""

    def __init__(self, batches: list[list[str]]) -> None:
        self.batches = batches
        self.timeouts: list[float] = []

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        self.timeouts.append(timeout)
        return self.batches.pop(0) if self.batches else []


def next_batch(consumer: RecordingConsumer) -> list[Any]:
    loop = SimpleNamespace(consumer=consumer, loop=LoopConfig(max_batch=10, max_wait_s=0.1))
    return ScoringConsumer._next_batch(loop)  # type: ignore[arg-type]


def test_fetched_messages_are_taken_without_waiting() -> None:
    consumer = RecordingConsumer([["m1", "m2"]])
    assert next_batch(consumer) == ["m1", "m2"]
    assert consumer.timeouts == [0]


def test_an_idle_loop_waits_up_to_max_wait() -> None:
    consumer = RecordingConsumer([[], ["m1"]])
    assert next_batch(consumer) == ["m1"]
    assert consumer.timeouts == [0, 0.1]


def test_the_dead_letter_reason_header_stays_utf8_and_keeps_the_field_it_names() -> None:
    """The parser echoes a bad value into its reason: a long multi-byte one is shortened at a
    character boundary, and the end of the reason, which names the field, is kept."""
    raw = json.dumps(
        {**json.loads(random_events(1, users=1, days=1, per_user=1)[0].to_json()), "level": "é" * 1000}
    ).encode()
    [record] = parse_batch([(raw, "events", 0, 5)]).errors
    assert len(record.reason.encode()) > 1024
    reason = dict(dlq_headers(record))["reason"]
    assert isinstance(reason, bytes)
    assert len(reason) <= 1024
    assert reason.decode("utf-8").endswith(record.reason[-40:])
    assert "$.level" in reason.decode("utf-8")
    assert header_text("short reason") == b"short reason"
