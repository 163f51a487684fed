"""The scorer loop's batching policy: a loop that is behind never waits for a batch."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from stream.consumer import LoopConfig, ScoringConsumer


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
