"""The archiver's files are on disk (data, then name) before it commits their offsets; its
offset commit heeds a stop signal while Kafka does not answer, and a refused commit does not stop
it; on assignment it asks for the committed offsets until the coordinator answers, and after a
stop during that wait it archives nothing."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from core.settings import Settings
from events.schema import Event
from features.online import OnlineEngine
from features.state_store import InMemoryStateStore
from features.store import InMemoryFeatureStore
from models.runtime import LoadedModel
from monitoring.metrics import Metrics
from stream import archiver
from stream.processor import BatchProcessor, Message
from stream.risk_store import InMemoryRiskStore
from tests.support import (
    STAND_IN_TOPIC,
    CommitRefusedOnce,
    CommitWaitsForBroker,
    KafkaMessage,
    ScriptedConsumer,
    StandInModel,
    random_events,
    record_fsyncs,
    seconds_to_stop_during_commit,
    wait_for,
)


def test_each_file_and_its_folder_are_fsynced_after_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = record_fsyncs(monkeypatch)
    events = random_events(3, users=4, days=3, per_user=20)
    rows = [(int(e.user_id[1:]) % 2, i, e) for i, e in enumerate(events)]
    written, _ = archiver.write_batch(tmp_path, rows)

    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) == written > 1
    for file in files:
        data = synced.index(str(file.with_suffix(".tmp")))  # the data, under its temporary name
        folder = synced.index(str(file.parent), data)  # then the rename, in its folder
        assert folder > data
    # Each new date folder's entry is synced in the root.
    assert synced.count(str(tmp_path)) == len({f.parent for f in files})


def _messages(first_offset: int, count: int) -> list[KafkaMessage]:
    """Returns `count` valid events of partition 0 as the consumer hands them over."""
    events = random_events(5, users=3, days=1, per_user=count)[:count]
    return [
        KafkaMessage(0, first_offset + i, msgspec.json.encode(e), key=e.user_id.encode()) for i, e in enumerate(events)
    ]


def _archived_rows(root: Path) -> int:
    return sum(pl.read_parquet(file).height for file in root.rglob("*.parquet"))


def _archiver(
    tmp_path: Path, consumer: object, monkeypatch: pytest.MonkeyPatch, *, require_event_key: bool = True
) -> archiver.Archiver:
    monkeypatch.setattr(archiver, "committing_consumer", lambda *_args, **_kw: consumer)
    settings = Settings(require_event_key=require_event_key)
    return archiver.Archiver(settings, tmp_path / "log", metrics=Metrics(), lag_every_s=3600)


def test_a_stop_signal_while_a_commit_waits_for_kafka_ends_the_archiver_and_leaves_the_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = CommitWaitsForBroker(batches=[_messages(0, 10)])
    worker = _archiver(tmp_path, consumer, monkeypatch)
    loop = threading.Thread(target=worker.run)
    loop.start()
    waited = seconds_to_stop_during_commit(consumer, loop, worker.stopping)
    assert waited < 2  # one wait slice, not the broker's silence
    assert worker.commit_abandoned
    assert not consumer.closed  # closing under the abandoned commit would be unsafe
    assert _archived_rows(tmp_path / "log") == 10  # the batch's files were written before the commit


def test_a_refused_commit_is_counted_and_logged_and_the_next_batch_commits_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = CommitRefusedOnce(batches=[_messages(0, 4), _messages(4, 3)])
    worker = _archiver(tmp_path, consumer, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=archiver.__name__):
        worker.run(max_idle_s=0.2)
    assert consumer.commits == 2
    assert consumer.committed == [[(0, 7)]]  # the second batch's commit covers the refused one's offsets
    assert worker.metrics.registry.get_sample_value("churn_archiver_commit_failures_total") == 1
    assert (worker.metrics.registry.get_sample_value("churn_archiver_last_commit_timestamp_seconds") or 0) > 0
    assert "offset commit refused" in caplog.text
    assert consumer.closed
    assert _archived_rows(tmp_path / "log") == 7


def test_an_event_dated_too_far_past_its_append_time_is_not_archived_as_the_scorer_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training reads the log, and its labels end at the log's newest event time: one event the
    scorer dead-letters for a wrong clock (here a year ahead) must not be in it."""
    events = random_events(5, users=3, days=1, per_user=4)[:4]
    appended = max(e.ts for e in events)
    skew_ms = Settings().max_future_skew_seconds * 1000
    future = msgspec.structs.replace(events[3], ts=appended + 365 * 86_400_000)
    just_within = msgspec.structs.replace(events[2], ts=appended + skew_ms)
    batch = [
        KafkaMessage(0, i, msgspec.json.encode(e), append_ms=appended, key=e.user_id.encode())
        for i, e in enumerate([events[0], events[1], just_within, future])
    ]
    worker = _archiver(tmp_path, CommitRefusedOnce(batches=[batch]), monkeypatch)
    worker.run(max_idle_s=0.2)
    archived = pl.concat([pl.read_parquet(f) for f in (tmp_path / "log").rglob("*.parquet")])
    assert sorted(archived["kafkaOffset"].to_list()) == [0, 1, 2]
    assert worker.skipped == 1


class CoordinatorSilent(ScriptedConsumer):
    """A consumer whose lookup of committed offsets times out `silent_tries` times (as while the
    group's coordinator is down) and then answers `committed_offset` for each partition. Like
    librdkafka, it calls the assignment callback from inside the first `consume`."""

    def __init__(self, batches: list[list[KafkaMessage]], silent_tries: int, committed_offset: int) -> None:
        super().__init__(assigned=[0], batches=batches)
        self.silent_tries, self.committed_offset = silent_tries, committed_offset
        self.lookups = 0
        self.on_assign: Any = None

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.on_assign = callbacks["on_assign"]

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.lookups += 1
        if self.lookups <= self.silent_tries:
            time.sleep(min(timeout, 0.05))
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return [TopicPartition(tp.topic, tp.partition, self.committed_offset) for tp in partitions]

    def consume(self, num_messages: int, timeout: float) -> list[KafkaMessage]:
        if self.on_assign is not None:
            assign, self.on_assign = self.on_assign, None
            assign(self, [TopicPartition(STAND_IN_TOPIC, p) for p in self.assigned])
        return super().consume(num_messages, timeout)

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        pass


def test_the_committed_offsets_are_asked_for_again_until_the_coordinator_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "log"
    archived = _messages(0, 10)  # archived before a crash that lost the commit past offset 3
    archiver.write_batch(root, [(0, m.offset(), msgspec.json.decode(m.value(), type=Event)) for m in archived])
    consumer = CoordinatorSilent(batches=[archived[3:]], silent_tries=3, committed_offset=3)  # Kafka replays from 3
    worker = _archiver(tmp_path, consumer, monkeypatch)
    monkeypatch.setattr(archiver, "COMMITTED_RETRY_PAUSE_S", 0.01)
    with caplog.at_level(logging.WARNING, logger=archiver.__name__):
        worker.run(max_idle_s=0.2)
    assert consumer.lookups == 4
    assert caplog.text.count("committed offsets unavailable") == 3
    assert worker.already_archived == {0: set(range(3, 10))}
    assert _archived_rows(root) == 10  # the replayed batch was skipped, not archived twice


def test_a_stop_while_the_coordinator_is_silent_ends_the_archiver_and_archives_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = CoordinatorSilent(batches=[_messages(0, 10)], silent_tries=10**9, committed_offset=0)
    worker = _archiver(tmp_path, consumer, monkeypatch)
    loop = threading.Thread(target=worker.run)
    loop.start()
    wait_for(lambda: consumer.lookups >= 2 or not loop.is_alive(), 10, "the archiver to ask again", 0.01)
    assert consumer.lookups >= 2  # the stop lands while the archiver asks again
    stopped_at = time.monotonic()
    worker.stopping.set()
    loop.join(10)
    assert not loop.is_alive()
    assert time.monotonic() - stopped_at < archiver.COMMITTED_TRY_S + archiver.COMMITTED_RETRY_PAUSE_S + 0.5
    assert worker.already_archived == {}
    assert not (tmp_path / "log").exists() or _archived_rows(tmp_path / "log") == 0


@pytest.mark.parametrize("key_required", [True, False])
def test_the_archive_holds_exactly_the_events_the_scorer_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_required: bool
) -> None:
    """The same messages through the scorer's batch path and the archiver: an event keyed by
    another user, dated a year past its append time or not JSON is dead-lettered by the one and
    left out by the other; the right key is applied and archived, and so is no key when
    `CHURN_REQUIRE_EVENT_KEY=false` (by default both refuse it)."""
    events = random_events(5, users=3, days=1, per_user=4)[:5]
    appended = max(e.ts for e in events)
    future = msgspec.structs.replace(events[3], ts=appended + 365 * 86_400_000)
    batch = [
        KafkaMessage(0, 0, msgspec.json.encode(events[0]), appended, key=events[0].user_id.encode()),
        KafkaMessage(0, 1, msgspec.json.encode(events[1]), appended, key=b"not-" + events[1].user_id.encode()),
        KafkaMessage(0, 2, msgspec.json.encode(events[2]), appended),
        KafkaMessage(0, 3, msgspec.json.encode(future), appended, key=future.user_id.encode()),
        KafkaMessage(0, 4, b"{not json", appended),
        KafkaMessage(0, 5, msgspec.json.encode(events[4]), appended, key=events[4].user_id.encode()),
    ]
    model = LoadedModel(StandInModel(), "churn-lightgbm", "1")
    scorer = BatchProcessor(
        OnlineEngine(), InMemoryStateStore(), InMemoryFeatureStore(), InMemoryRiskStore(), Metrics(), lambda: model,
        max_future_skew_ms=Settings().max_future_skew_seconds * 1000, key_required=key_required,
    )  # fmt: skip
    verdict = scorer.process([Message(m.value(), "events", 0, m.offset(), appended, m.key()) for m in batch])
    dead = {d.offset for d in verdict.dead_letters}
    assert dead == ({1, 2, 3, 4} if key_required else {1, 3, 4})

    worker = _archiver(tmp_path, CommitRefusedOnce(batches=[batch]), monkeypatch, require_event_key=key_required)
    worker.run(max_idle_s=0.2)
    archived = pl.concat([pl.read_parquet(f) for f in (tmp_path / "log").rglob("*.parquet")])
    assert sorted(archived["kafkaOffset"].to_list()) == sorted({m.offset() for m in batch} - dead)
