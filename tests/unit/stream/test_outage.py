"""`stream.outage.StoreOutage` and the scorer loop's use of it: not-ready while a batch is
retried, ready again once a batch is applied or once the retried partitions belong to another
scorer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from unittest.mock import Mock

from confluent_kafka import TopicPartition

from core.errors import ServiceUnavailableError, StoreRefusedError
from core.settings import Settings
from events.schema import parse_batch
from features.online import OnlineEngine
from features.state_store import InMemoryStateStore
from features.store import InMemoryFeatureStore
from models.runtime import LoadedModel
from monitoring.metrics import Metrics
from stream.consumer import LoopConfig, ScoringConsumer
from stream.outage import FIRST_BACKOFF_S, StoreOutage
from stream.processor import BatchProcessor, partition_key
from stream.risk_store import InMemoryRiskStore
from tests.support import (
    GUEST_EVENT_JSON,
    STAND_IN_TOPIC,
    CommitWaitsForBroker,
    KafkaMessage,
    ScriptedConsumer,
    StandInModel,
    random_events,
    seconds_to_stop_during_commit,
)

TOPIC = STAND_IN_TOPIC


def gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_failures_back_off_and_an_applied_batch_ends_the_outage() -> None:
    metrics = Metrics()
    outage = StoreOutage(metrics, max_backoff_s=0.3)
    waits = [outage.failed(ServiceUnavailableError("down"), 10.0 + i, {(TOPIC, 0)}) for i in range(4)]
    assert waits == [FIRST_BACKOFF_S, 0.2, 0.3, 0.3]
    assert outage.ongoing
    assert outage.since == 10.0
    assert gauge(metrics, "churn_scorer_ready") == 0
    assert gauge(metrics, "churn_scorer_store_failures") == 4
    outage.applied(20.0)
    assert not outage.ongoing
    assert gauge(metrics, "churn_scorer_ready") == 1
    assert gauge(metrics, "churn_scorer_store_failures") == 0
    assert outage.failed(ServiceUnavailableError("down"), 30.0, {(TOPIC, 0)}) == FIRST_BACKOFF_S


def test_a_refusing_redis_is_exported_by_reason_until_the_outage_ends() -> None:
    metrics = Metrics()
    outage = StoreOutage(metrics, max_backoff_s=5.0)
    outage.failed(StoreRefusedError("OOM", "oom"), 1.0, {(TOPIC, 0)})
    outage.failed(StoreRefusedError("READONLY", "readonly"), 2.0, {(TOPIC, 0)})
    assert gauge(metrics, "churn_scorer_redis_refusing", reason="oom") == 0
    assert gauge(metrics, "churn_scorer_redis_refusing", reason="readonly") == 1
    outage.applied(3.0)
    assert gauge(metrics, "churn_scorer_redis_refusing", reason="readonly") == 0


def test_the_outage_ends_only_when_no_retried_partition_is_still_assigned() -> None:
    metrics = Metrics()
    outage = StoreOutage(metrics, max_backoff_s=5.0)
    assert not outage.moved([])  # no outage: nothing to end
    outage.failed(ServiceUnavailableError("down"), 1.0, {(TOPIC, 0), (TOPIC, 1)})
    assert not outage.moved([(TOPIC, 1), (TOPIC, 2)])  # partition 1's events come back to this scorer
    assert gauge(metrics, "churn_scorer_ready") == 0
    assert outage.moved([(TOPIC, 2)])
    assert not outage.ongoing
    assert gauge(metrics, "churn_scorer_ready") == 1
    assert gauge(metrics, "churn_scorer_store_failures") == 0


class StoreDown:
    """A batch processor whose stores are down: every batch raises `ServiceUnavailableError`."""

    class Cpu:
        def start(self) -> None:
            pass

        def mark(self, stage: str) -> None:
            pass

        def flush(self) -> None:
            pass

    class States:
        def applied(self, partitions: list[str]) -> dict[str, int]:
            return dict.fromkeys(partitions, 7)  # where the scripted batch starts: Redis is not behind

    def __init__(self) -> None:
        self.cpu = self.Cpu()
        self.states = self.States()

    def process(self, messages: Any, expected: Any) -> Any:
        raise ServiceUnavailableError("Redis is down")

    def forget(self) -> None:
        pass


class NoModels:
    def refresh(self) -> None:
        pass


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def start_loop(
    consumer: ScriptedConsumer,
    processor: StoreDown,
    metrics: Metrics,
    dlq: Any = None,
    report_lag: Callable[[], None] | None = None,
) -> tuple[ScoringConsumer, threading.Thread]:
    """Starts a scorer loop on `consumer` and `processor` (and `dlq` as its dead-letter
    producer, `report_lag` as its lag report at every pass, if given) in a thread of its own;
    returns the scorer (set its `stopping` to end the loop) and the thread."""
    scorer = ScoringConsumer(
        Settings(kafka_bootstrap="127.0.0.1:1"),  # nothing listens there: no service is used
        processor,  # type: ignore[arg-type]
        NoModels(),  # type: ignore[arg-type]
        metrics,
        LoopConfig(max_wait_s=0.01, lag_every_s=0 if report_lag else 3600),
    )
    scorer.consumer.close()
    scorer.consumer = consumer  # type: ignore[assignment]
    if dlq is not None:
        scorer.dlq = dlq
    scorer.recreate_dlq = Mock(return_value=False)  # nothing to ask: no broker here
    if report_lag is not None:
        scorer.report_lag = report_lag  # type: ignore[method-assign]
    loop = threading.Thread(target=scorer.run)
    loop.start()
    return scorer, loop


def run_scorer(consumer: ScriptedConsumer, revoke_after_failure: bool) -> tuple[Metrics, list[float | None]]:
    """Runs a scorer loop on `consumer` whose one batch fails, optionally revokes every
    partition once the loop idles after the failure, and returns the metrics and the readiness
    seen: after the failure, then after 20 more idle polls (or once ready, if revoked)."""
    metrics = Metrics()
    scorer, loop = start_loop(consumer, StoreDown(), metrics)
    seen = []
    try:
        wait_until(lambda: consumer.idle_polls > 0, "the loop to idle after the failed batch")
        seen.append(gauge(metrics, "churn_scorer_ready"))
        if revoke_after_failure:
            consumer.assigned = []
            wait_until(lambda: gauge(metrics, "churn_scorer_ready") == 1, "the scorer to be ready")
        else:
            polls = consumer.idle_polls
            wait_until(lambda: consumer.idle_polls > polls + 20, "20 idle polls")
        seen.append(gauge(metrics, "churn_scorer_ready"))
    finally:
        scorer.stopping.set()
        loop.join(5)
    return metrics, seen


def test_a_scorer_whose_retried_partitions_were_revoked_is_ready_again() -> None:
    consumer = ScriptedConsumer(assigned=[0, 1])
    metrics, seen = run_scorer(consumer, revoke_after_failure=True)
    assert consumer.seeks == [(0, 7)]  # the failed batch was rewound
    assert seen == [0, 1]
    assert gauge(metrics, "churn_scorer_store_failures") == 0


def test_a_scorer_still_holding_the_retried_partition_stays_not_ready_while_idle() -> None:
    consumer = ScriptedConsumer(assigned=[0, 1])
    metrics, seen = run_scorer(consumer, revoke_after_failure=False)
    assert seen == [0, 0]
    assert gauge(metrics, "churn_scorer_store_failures") == 1


def test_the_lag_is_reported_while_every_batch_fails() -> None:
    """An outage is when the lag grows most, and `ChurnConsumerLagHigh` reads it: the loop's
    housekeeping was skipped after a failed batch, so the gauges kept their last value (0 in a
    live test, 21,205 messages behind) until a batch was applied again."""
    consumer = ScriptedConsumer(assigned=[0], batches=[[KafkaMessage(0, 7)] for _ in range(1000)])
    reports: list[int] = []
    scorer, loop = start_loop(consumer, StoreDown(), Metrics(), report_lag=lambda: reports.append(len(consumer.seeks)))
    try:
        wait_until(lambda: len(consumer.seeks) >= 3, "three failed attempts")
    finally:
        scorer.stopping.set()
        loop.join(5)
    assert consumer.idle_polls == 0  # every pass held the retried batch
    assert {1, 2} <= set(reports)  # reported after the first and the second failed attempts


class StoresUp(StoreDown):
    """A batch processor whose every batch succeeds without dead letters."""

    def process(self, messages: Any, expected: Any) -> Any:
        return SimpleNamespace(dead_letters=[])

    def count_unapplied(self, result: Any) -> None:
        pass


def test_a_stop_signal_while_a_commit_waits_for_kafka_ends_the_loop_and_leaves_the_consumer() -> None:
    consumer = CommitWaitsForBroker()
    scorer, loop = start_loop(consumer, StoresUp(), Metrics())
    waited = seconds_to_stop_during_commit(consumer, loop, scorer.stopping)
    assert waited < 2  # one wait slice, not the broker's silence
    assert scorer.commit_abandoned
    assert not consumer.closed  # closing under the abandoned commit would be unsafe


class ReadsAgainAfterSeek(ScriptedConsumer):
    """A consumer of one batch on partition 0 that delivers it again after each seek (as Kafka
    does for a rewound partition) and accepts every commit."""

    def __init__(self, batch: list[KafkaMessage]) -> None:
        super().__init__(assigned=[0], batches=[batch])
        self.batch = batch
        self.commits = 0

    def seek(self, partition: TopicPartition) -> None:
        super().seek(partition)
        self.batches.append(self.batch)

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> list[TopicPartition]:
        self.commits += 1
        return []


class DeadLetterTopicDownOnce:
    """The dead-letter producer of a scorer whose first delivery is not acknowledged."""

    def __init__(self) -> None:
        self.attempts = 0
        self.delivered: list[dict[str, Any]] = []

    def deliver(self, topic: str, messages: Any, timeout_s: float, what: str) -> None:
        self.attempts += 1
        letters = list(messages)
        if self.attempts == 1:
            raise ServiceUnavailableError(f"topic {topic!r} did not acknowledge {len(letters)} {what}")
        self.delivered += letters

    def flush(self, timeout_s: float) -> int:
        return 0


def test_a_batch_retried_after_a_dead_letter_outage_counts_each_message_once() -> None:
    """The batch's states are saved before its dead letters fail: the retry finds its events
    applied (duplicates), and its invalid, guest and unknown-page messages are counted once."""
    events = [e.to_json() for e in random_events(3, users=4, days=2, per_user=10)]
    unknown_page = events[0].replace(b'"page":"', b'"page":"Podcast', 1)
    values = [*events, b"{not json", GUEST_EVENT_JSON, unknown_page]
    batch = [KafkaMessage(0, 7 + i, value) for i, value in enumerate(values)]
    metrics = Metrics()
    model = LoadedModel(StandInModel(), "churn-lightgbm", "1")
    states = InMemoryStateStore()
    states.offsets[partition_key(TOPIC, 0)] = 7  # where the batch starts: Redis is not behind
    processor = BatchProcessor(
        OnlineEngine(), states, InMemoryFeatureStore(), InMemoryRiskStore(), metrics, lambda: model,
        wall_clock_ms=lambda: 0,
    )  # fmt: skip
    consumer = ReadsAgainAfterSeek(batch)
    dlq = DeadLetterTopicDownOnce()
    scorer, loop = start_loop(consumer, processor, metrics, dlq)  # type: ignore[arg-type]
    try:
        wait_until(lambda: consumer.commits == 1, "the retried batch's commit")
        polls = consumer.idle_polls
        wait_until(lambda: consumer.idle_polls > polls, "the loop to go on after the batch")  # it did not die
    finally:
        scorer.stopping.set()
        loop.join(5)
    assert consumer.seeks == [(0, 7)]  # the fault landed: the batch was rewound and retried
    assert dlq.attempts == 2
    assert len(dlq.delivered) == 1
    assert isinstance(scorer.recreate_dlq, Mock)
    assert scorer.recreate_dlq.call_count == 1  # asked whether the topic was deleted, once per failure
    counted = {
        o: gauge(metrics, "churn_events_consumed_total", outcome=o) for o in ("ok", "invalid", "guest", "duplicate")
    }
    applied = len(events) + 1  # the unknown page is applied too
    assert counted == {"ok": applied, "invalid": 1, "guest": 1, "duplicate": applied}
    unknown_pages = parse_batch([(v, TOPIC, 0, 7 + i) for i, v in enumerate(values)]).unknown_pages
    assert unknown_pages >= 1
    assert gauge(metrics, "churn_unknown_pages_total") == unknown_pages
