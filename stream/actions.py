"""A consumer of the tier-change topic, as a CRM integration would run it (`churn actions tail`).

It reads `risk.changes` in its own consumer group and hands each change to a sink: printing it
(one JSON line), or POSTing it to a webhook. Offsets are committed after the sink has taken a
batch, so a crash re-delivers what came after the last commit Kafka accepted (normally at most
the last batch; more if Kafka refused commits since): a receiver deduplicates by
(`source_partition`, `source_offset`), which each change has alone (`prediction_id` does not
tell two changes apart: a late event can change a user's features, and tier, without a newer
event time). A webhook that keeps
failing (`max_attempts`, exponential backoff) or refuses a change (4xx) does not stop the
stream: the change goes to the dead-letter topic `<changes topic>.dlq` with the reason, and the
consumer moves on. One that answers as if it were misconfigured (401, 403, 404, 405, 407)
stops it, the batch uncommitted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException

from core.errors import ConfigError, ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings
from stream.changes import DECODER, ENCODER, TierChange
from stream.kafka import IdempotentProducer, commit_unless_stopped, committing_consumer, dead_letter
from stream.topics import recreate_if_deleted

log = logging.getLogger(__name__)
# The pause before a batch's dead letters are sent again while Kafka does not take them: it
# doubles from the first to the last.
DLQ_RETRY_FIRST_S = 1.0
DLQ_RETRY_MAX_S = 30.0
# The 4xx answers that say "not now" rather than "not this change" (request timeout, too early,
# too many requests): retried like a 5xx; any other 4xx refuses the change for good.
RETRIED_4XX = frozenset({408, 425, 429})
# The answers that say the webhook itself is wrong (credentials, URL, method), not this change:
# every change would get the same, so the tail stops with the error (the batch uncommitted)
# rather than send the whole stream to the dead-letter topic.
MISCONFIGURED_4XX = frozenset({401, 403, 404, 405, 407})


class DeliveryFailedError(Exception):
    """A sink gave up on one change (the reason is the message)."""


class DeliveryStoppedError(Exception):
    """A stop signal came before a sink had delivered or given up on a change: it is neither
    delivered nor refused, and goes again after the restart (its batch is not committed)."""


@dataclass
class WebhookSink:
    """POSTs each change as JSON to `url`; retries connection errors, timeouts, 5xx and
    `RETRIED_4XX` up to `max_attempts` times with exponential backoff from `backoff_s`; stops at
    `MISCONFIGURED_4XX`; any other 4xx is final at once.
    `stopping` (the process's stop signal) ends the backoff between attempts."""

    url: str
    max_attempts: int = 5
    backoff_s: float = 0.2
    timeout_s: float = 5.0
    client: httpx.Client = field(default_factory=lambda: httpx.Client())
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        """Refuses a URL no POST can go to (no scheme, another scheme, no host).

        Raises:
            ConfigError: it is one. Found only at the first delivery, each change failed its
                attempts as if the receiver were down and went to the DLQ, the stream committed.
        """
        try:
            url = httpx.URL(self.url)
            why = "" if url.scheme in ("http", "https") and url.host else "it needs http:// or https:// and a host"
        except httpx.InvalidURL as exc:
            why = str(exc)
        if why:
            msg = f"webhook {self.url!r} is not a URL changes can be POSTed to: {why} (e.g. https://crm.example/hooks/churn)"
            raise ConfigError(msg)

    def __call__(self, change: TierChange) -> None:
        """Delivers one change.

        Raises:
            DeliveryFailedError: it gave up (the reason says why).
            DeliveryStoppedError: a stop signal came during the backoff before another attempt.
            ConfigError: the webhook answered one of `MISCONFIGURED_4XX`.
        """
        body = ENCODER.encode(change)
        reason = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                answer = self.client.post(
                    self.url, content=body, headers={"content-type": "application/json"}, timeout=self.timeout_s
                )
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if answer.status_code < 300:
                    return
                reason = f"HTTP {answer.status_code}: {answer.text[:200]}"
                if answer.status_code in MISCONFIGURED_4XX:
                    msg = (
                        f"webhook {self.url} answered {reason}: check the URL and the receiver's credentials"
                        " (the batch in hand is not committed: it is delivered again after a restart)"
                    )
                    raise ConfigError(msg)
                if 400 <= answer.status_code < 500 and answer.status_code not in RETRIED_4XX:
                    break  # the receiver refuses this change: retrying cannot help
            if attempt < self.max_attempts and self.stopping.wait(self.backoff_s * 2 ** (attempt - 1)):
                msg = f"webhook {self.url}: stopped after {attempt} attempt(s): {reason}"
                raise DeliveryStoppedError(msg)
        msg = f"webhook {self.url} gave up after {attempt} attempt(s): {reason}"
        raise DeliveryFailedError(msg)


@dataclass
class TailReport:
    """What a tail run did."""

    delivered: int = 0
    dead_lettered: int = 0
    unreadable: int = 0
    commit_abandoned: bool = False  # stopped while the last batch's commit waited for Kafka
    stopped_mid_batch: bool = False  # stopped before the sink had taken the whole batch (not committed)

    def counts(self) -> str:
        """Returns the counts as the CLI's summary line starts: "delivered N, dead-lettered M"."""
        return f"delivered {self.delivered}, dead-lettered {self.dead_lettered + self.unreadable}"


def tail(
    settings: Settings,
    sink: Callable[[TierChange], None],
    *,
    group: str,
    stopping: threading.Event | None = None,
    idle_exit_s: float | None = None,
    batch: int = 500,
    report: TailReport | None = None,
) -> TailReport:
    """Consumes the tier-change topic in `group` (from its start for a new group) and hands each
    change to `sink`, committing after each batch; returns the counts (in `report` when given,
    so a caller whose run is interrupted still has them). A change the sink gives
    up on (DeliveryFailedError), or an unreadable message, goes to `<topic>.dlq` with a
    `reason` header. Stops when `stopping` is set or after `idle_exit_s` without messages; a
    stop in the middle of a batch (looked at before each change, and what the sink raises as
    DeliveryStoppedError) leaves the batch uncommitted, so the rest is delivered after the
    restart, at least once.

    While Kafka does not take a batch's dead letters, they are sent again with backoff (up to
    `DLQ_RETRY_MAX_S` apart) until it does or `stopping` is set; nothing of the batch is
    committed before, so a stop replays it after the restart (delivery is at least once).
    """
    topic = settings.tier_changes_topic
    dlq_topic = f"{topic}.dlq"
    consumer = committing_consumer(settings, group)
    report = report if report is not None else TailReport()
    stop = stopping or threading.Event()
    dlq = IdempotentProducer(kafka_config(settings, acks="all"), interrupt=stop)
    consumer.subscribe([topic])
    last_message = time.monotonic()
    try:
        while not stop.is_set():
            messages = [m for m in consumer.consume(batch, 0.5) if _usable(m)]
            if not messages:
                if idle_exit_s is not None and consumer.assignment() and time.monotonic() - last_message > idle_exit_s:
                    break
                continue
            last_message = time.monotonic()
            dead, complete = _hand_over(messages, sink, stop, report)
            if not complete:
                # Stopped before the sink had taken the whole batch: it is not committed, and
                # after the restart it is delivered again from its start (at least once).
                report.stopped_mid_batch = True
                break
            # Every dead letter acknowledged (not only sent) before the commit: one lost after its
            # batch was committed would be lost for good.
            if dead and not _deliver_dead_letters(settings, dlq, dlq_topic, dead, stop):
                break  # stopped before Kafka took them: the batch is not committed
            try:
                committed = _commit(consumer, stop)
            except KeyboardInterrupt:  # the CLI's second Ctrl-C or SIGTERM while the commit waits
                report.commit_abandoned = True
                raise
            if not committed:
                report.commit_abandoned = True
                break
    finally:
        if not report.commit_abandoned:  # closing under the abandoned commit would be unsafe
            consumer.close()
    return report


def _hand_over(
    messages: list[Any], sink: Callable[[TierChange], None], stop: threading.Event, report: TailReport
) -> tuple[list[dict[str, Any]], bool]:
    """Hands a batch's changes to `sink` in order, counting them in `report`; returns the dead
    letters (unreadable messages, changes the sink gave up on) and whether the whole batch was
    handled (False: a stop signal came first, before a change or during the sink's retries)."""
    dead: list[dict[str, Any]] = []
    for message in messages:
        if stop.is_set():
            return dead, False
        raw = message.value() or b""
        try:
            change = DECODER.decode(raw)
        except msgspec.DecodeError as exc:  # not a change event: dead-lettered, never a crash
            report.unreadable += 1
            dead.append(_dead_letter(message, f"unreadable: {exc}"))
            continue
        try:
            sink(change)
            report.delivered += 1
        except DeliveryFailedError as exc:
            report.dead_lettered += 1
            log.warning("change of user %s dead-lettered: %s", change.user_id, exc)
            dead.append(_dead_letter(message, str(exc)))
        except DeliveryStoppedError as exc:
            log.info("change of user %s not delivered: %s", change.user_id, exc)
            return dead, False
    return dead, True


def _deliver_dead_letters(
    settings: Settings, dlq: IdempotentProducer, topic: str, dead: list[dict[str, Any]], stopping: threading.Event
) -> bool:
    """Delivers a batch's dead letters and returns True once Kafka acknowledged every one; while
    it does not (down, or refusing), sends them again after a pause that doubles from
    `DLQ_RETRY_FIRST_S` to `DLQ_RETRY_MAX_S` (a dependency's failure is retried, never fatal;
    a topic deleted meanwhile is created again first, with one partition as
    `ensure_changes_topic` makes it); returns False once `stopping` is set. A dead letter in
    flight when a wait gave up may land twice (what was not yet sent is dropped before the
    retry)."""
    pause = DLQ_RETRY_FIRST_S
    while not stopping.is_set():
        try:
            dlq.deliver(topic, dead, 30, "dead letter(s)")
            return True
        except ServiceUnavailableError as exc:
            if not recreate_if_deleted(settings, topic, 1, stopping):  # logged there if it was
                log.warning("dead letters not acknowledged, sending them again in %.1f s: %s", pause, exc)
        stopping.wait(pause)
        pause = min(2 * pause, DLQ_RETRY_MAX_S)
    return False


def _commit(consumer: Consumer, stopping: threading.Event) -> bool:
    """Commits the consumer's positions after a batch the sink has taken; returns False when a
    stop signal came while the commit waited for a broker (the commit is abandoned: the batch is
    delivered again after the restart). A refused commit is logged and the tail goes on: the
    next batch's commit covers it, and until then a restart delivers the batch again, as a crash
    would (delivery is at least once)."""
    try:
        if not commit_unless_stopped(consumer, None, stopping):
            log.warning("stopped while the offset commit waited for Kafka: the batch will be delivered again")
            return False
    except KafkaException as exc:
        log.warning("offset commit refused, the next batch's commit covers it: %s", exc)
    return True


def _dead_letter(message: Any, reason: str) -> dict[str, Any]:
    """Returns the `Producer.produce` arguments of the dead letter of a tier-change topic's
    `message`: as it came (key and value, the value cut if too large: `dead_letter`), with a
    `reason` header and where it came from."""
    headers: list[tuple[str, str | bytes | None]] = [
        ("reason", reason[:1024].encode()),
        ("source_topic", str(message.topic()).encode()),
        ("source_partition", str(message.partition()).encode()),
        ("source_offset", str(message.offset()).encode()),
    ]
    return dead_letter(message.value() or b"", headers, message.key())


def _usable(message: object) -> bool:
    error = message.error()  # type: ignore[attr-defined]
    if error is None:
        return True
    if error.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer error: %s", error)
    return False
