"""The tier-change tail's offset commit: a stop signal (or Ctrl-C, as the CLI maps SIGTERM) ends
it while Kafka does not answer and leaves the consumer unclosed, and a refused commit does not
stop the tail; dead letters Kafka does not take are sent again until it does, and nothing is
committed before; a stop within a batch (in the webhook's backoff or between changes) leaves the
batch uncommitted and gives nothing up to the dead-letter topic."""

from __future__ import annotations

import _thread
import logging
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from core.errors import ConfigError, ServiceUnavailableError
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

    # SIGINT raises KeyboardInterrupt here whatever handler an earlier test installed (a scorer's
    # sets a stop event) or a CI shell left (a background job ignores SIGINT): as in the CLI.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_in_the_commit, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            actions.tail(Settings(kafka_bootstrap="127.0.0.1:1"), lambda _change: None, group="g")
    finally:
        consumer.answer.set()
        signal.signal(signal.SIGINT, previous)
    assert not consumer.closed


class DeadLetterTopicDown:
    """Stands in for the tail's dead-letter producer: Kafka does not acknowledge the first
    `refusals` deliveries (or any, with None), then takes them."""

    def __init__(self, refusals: int | None) -> None:
        self.refusals, self.tries = refusals, 0
        self.delivered: list[dict[str, Any]] = []

    def deliver(self, topic: str, messages: list[dict[str, Any]], timeout_s: float, what: str) -> None:
        self.tries += 1
        if self.refusals is None or self.tries <= self.refusals:
            msg = f"topic {topic!r} did not acknowledge {len(messages)} {what}"
            raise ServiceUnavailableError(msg)
        self.delivered.extend(messages)


def _with_dlq(dlq: DeadLetterTopicDown, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actions, "IdempotentProducer", lambda *_args, **_kw: dlq)
    monkeypatch.setattr(actions, "DLQ_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(actions, "recreate_if_deleted", lambda *_args, **_kw: False)  # no broker here


def test_dead_letters_kafka_does_not_take_are_sent_again_before_the_commit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = CommitRefusedOnce(batches=[[KafkaMessage(0, 0, b"not a change")], _changes(1, ["u1"])])
    _use(consumer, monkeypatch)
    dlq = DeadLetterTopicDown(refusals=2)
    _with_dlq(dlq, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=actions.__name__):
        report = actions.tail(Settings(kafka_bootstrap="127.0.0.1:1"), lambda _change: None, group="g", idle_exit_s=0.2)
    assert dlq.tries == 3
    assert [letter["value"] for letter in dlq.delivered] == [b"not a change"]
    assert caplog.text.count("dead letters not acknowledged") == 2
    assert consumer.commits == 2  # the dead letters were taken before the first batch's commit
    assert (report.unreadable, report.delivered) == (1, 1)


def test_a_dead_letter_keeps_the_message_its_key_and_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = CommitRefusedOnce(batches=[[KafkaMessage(3, 41, b"not a change", key=b"u9")]])
    _use(consumer, monkeypatch)
    dlq = DeadLetterTopicDown(refusals=0)
    _with_dlq(dlq, monkeypatch)
    actions.tail(Settings(kafka_bootstrap="127.0.0.1:1"), lambda _change: None, group="g", idle_exit_s=0.2)
    [letter] = dlq.delivered
    assert (letter["value"], letter["key"]) == (b"not a change", b"u9")
    headers = dict(letter["headers"])
    assert headers["reason"].startswith(b"unreadable: ")
    assert (headers["source_partition"], headers["source_offset"]) == (b"3", b"41")


def test_a_stop_while_kafka_does_not_take_the_dead_letters_ends_the_tail_and_commits_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = CommitRefusedOnce(batches=[[KafkaMessage(0, 0, b"not a change")]])
    _use(consumer, monkeypatch)
    dlq = DeadLetterTopicDown(refusals=None)
    _with_dlq(dlq, monkeypatch)
    stopping = threading.Event()
    loop = threading.Thread(
        target=lambda: actions.tail(
            Settings(kafka_bootstrap="127.0.0.1:1"), lambda _c: None, group="g", stopping=stopping
        )
    )
    loop.start()
    wait_for(lambda: dlq.tries >= 3, 10, "dead letters sent again", 0.005)
    stopping.set()
    loop.join(5)
    assert not loop.is_alive()
    assert consumer.commits == 0  # the batch is read again after the restart
    assert consumer.closed


def test_a_stop_signal_ends_the_webhook_backoff_without_giving_the_change_up() -> None:
    attempts: list[int] = []

    def unavailable(_request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        return httpx.Response(503, text="busy")

    stopping = threading.Event()
    sink = actions.WebhookSink(
        "http://crm.test/changes",
        backoff_s=30,
        client=httpx.Client(transport=httpx.MockTransport(unavailable)),
        stopping=stopping,
    )
    threading.Timer(0.3, stopping.set).start()
    started = time.monotonic()
    # Stopped, not refused: the change must not go to the dead-letter topic.
    with pytest.raises(actions.DeliveryStoppedError, match=r"stopped after 1 attempt\(s\): HTTP 503: busy"):
        sink(tier_change("u1"))
    assert time.monotonic() - started < 5  # not the 30 s backoff
    assert len(attempts) == 1


@pytest.mark.parametrize(("status", "attempts"), [(408, 2), (425, 2), (429, 2), (503, 2), (400, 1), (422, 1)])
def test_a_webhook_retries_a_not_now_answer_and_gives_up_on_a_refusal_at_once(status: int, attempts: int) -> None:
    answers = [status, 200]

    def receiver(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(answers.pop(0), text="answer")

    sink = actions.WebhookSink(
        "http://crm.test/changes", backoff_s=0.001, client=httpx.Client(transport=httpx.MockTransport(receiver))
    )
    if attempts == 1:
        with pytest.raises(actions.DeliveryFailedError, match=f"after 1 attempt\\(s\\): HTTP {status}"):
            sink(tier_change("u1"))
    else:
        sink(tier_change("u1"))
    assert len(answers) == 2 - attempts


@pytest.mark.parametrize("url", ["localhost:18999/hook", "htp://crm.test/changes", "http:///changes", "crm.test"])
def test_a_webhook_url_no_post_can_go_to_is_refused_before_any_change_is_taken(url: str) -> None:
    """Found only at the first POST, each change failed its attempts as if the receiver were
    down, went to the dead-letter topic and was committed: the whole stream, exit 0."""
    with pytest.raises(ConfigError, match="is not a URL changes can be POSTed to"):
        actions.WebhookSink(url)
    actions.WebhookSink("https://crm.test:8443/hooks/churn?token=t")  # what is accepted


def test_a_webhook_answering_as_if_misconfigured_stops_the_tail_and_gives_nothing_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong token (401) would send every change to the dead-letter topic, one after another:
    the tail stops instead, with nothing committed and nothing dead-lettered."""
    posts: list[int] = []

    def receiver(_request: httpx.Request) -> httpx.Response:
        posts.append(1)
        return httpx.Response(401, text="token expired")

    consumer = CommitRefusedOnce(batches=[_changes(0, ["u1", "u2"])])
    _use(consumer, monkeypatch)
    dlq = DeadLetterTopicDown(refusals=0)
    _with_dlq(dlq, monkeypatch)
    sink = actions.WebhookSink("http://crm.test/changes", client=httpx.Client(transport=httpx.MockTransport(receiver)))
    with pytest.raises(ConfigError, match=r"answered HTTP 401: token expired: check the URL"):
        actions.tail(Settings(kafka_bootstrap="127.0.0.1:1"), sink, group="g", idle_exit_s=0.2)
    assert posts == [1]  # not retried: every attempt would get the same
    assert (consumer.commits, dlq.tries) == (0, 0)
    assert consumer.closed


@pytest.mark.parametrize("stop_in", ["the sink's retries", "between changes"])
def test_a_stop_within_a_batch_leaves_it_uncommitted_and_dead_letters_nothing(
    stop_in: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = CommitRefusedOnce(batches=[_changes(0, ["u1", "u2", "u3"])])
    _use(consumer, monkeypatch)
    dlq = DeadLetterTopicDown(refusals=0)
    _with_dlq(dlq, monkeypatch)
    stopping = threading.Event()
    delivered: list[str] = []

    def sink(change: TierChange) -> None:
        if change.user_id == "u2":
            stopping.set()  # the signal arrives while u2 is being delivered
            if stop_in == "the sink's retries":
                raise actions.DeliveryStoppedError("stopped after 1 attempt(s)")
        delivered.append(change.user_id)

    report = actions.tail(Settings(kafka_bootstrap="127.0.0.1:1"), sink, group="g", stopping=stopping)
    assert delivered == (["u1"] if stop_in == "the sink's retries" else ["u1", "u2"])
    assert report.stopped_mid_batch
    assert consumer.commits == 0  # the whole batch goes again after the restart
    assert dlq.tries == 0
    assert consumer.closed
