"""The tier-change tail's offset commit: a stop signal (or Ctrl-C, as the CLI maps SIGTERM) ends
it while Kafka does not answer and leaves the consumer unclosed, and a refused commit does not
stop the tail."""

from __future__ import annotations

import _thread
import logging
import threading
import time

import pytest

from core.settings import Settings
from stream import actions
from stream.changes import ENCODER, TierChange
from tests.support import (
    CommitRefusedOnce,
    CommitWaitsForBroker,
    KafkaMessage,
    seconds_to_stop_during_commit,
    tier_change,
    wait_for,
)


def _changes(first_offset: int, users: list[str]) -> list[KafkaMessage]:
    """Returns one change message of partition 0 per user, as the consumer hands them over."""
    return [KafkaMessage(0, first_offset + i, ENCODER.encode(tier_change(u))) for i, u in enumerate(users)]


def _use(consumer: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actions, "committing_consumer", lambda *_args, **_kw: consumer)


def test_a_stop_signal_while_a_commit_waits_for_kafka_ends_the_tail_and_leaves_the_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = CommitWaitsForBroker(batches=[_changes(0, ["u1", "u2"])])
    _use(consumer, monkeypatch)
    delivered: list[TierChange] = []
    stopping = threading.Event()
    reports: list[actions.TailReport] = []
    settings = Settings(kafka_bootstrap="127.0.0.1:1")  # nothing listens there: the DLQ is never used
    loop = threading.Thread(
        target=lambda: reports.append(actions.tail(settings, delivered.append, group="g", stopping=stopping))
    )
    loop.start()
    waited = seconds_to_stop_during_commit(consumer, loop, stopping)
    assert waited < 2  # one wait slice, not the broker's silence
    assert [c.user_id for c in delivered] == ["u1", "u2"]  # the sink had the batch before the commit
    assert reports[0].commit_abandoned
    assert not consumer.closed  # closing under the abandoned commit would be unsafe


def test_a_refused_commit_is_logged_and_the_tail_goes_on_to_the_next_batch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = CommitRefusedOnce(batches=[_changes(0, ["u1"]), _changes(1, ["u2", "u3"])])
    _use(consumer, monkeypatch)
    delivered: list[TierChange] = []
    with caplog.at_level(logging.WARNING, logger=actions.__name__):
        report = actions.tail(Settings(kafka_bootstrap="127.0.0.1:1"), delivered.append, group="g", idle_exit_s=0.2)
    assert [c.user_id for c in delivered] == ["u1", "u2", "u3"]
    assert report.delivered == 3
    assert consumer.commits == 2
    assert consumer.committed == [None]  # the second commit, of the consumer's positions, covers the first batch
    assert not report.commit_abandoned
    assert "offset commit refused" in caplog.text
    assert consumer.closed


def test_ctrl_c_while_a_commit_waits_for_kafka_leaves_the_consumer_unclosed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`churn actions tail` turns SIGTERM into KeyboardInterrupt, as Ctrl-C is, rather than a stop
    event: one landing in the commit's wait must not close the consumer under the pending commit."""
    consumer = CommitWaitsForBroker(batches=[_changes(0, ["u1"])])
    _use(consumer, monkeypatch)

    def interrupt_in_the_commit() -> None:
        wait_for(lambda: consumer.commits == 1, 10, "the batch's commit", 0.005)
        time.sleep(0.1)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_in_the_commit, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            actions.tail(Settings(kafka_bootstrap="127.0.0.1:1"), lambda _change: None, group="g")
    finally:
        consumer.answer.set()
    assert not consumer.closed
