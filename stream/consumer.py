"""`churn consume`: the scoring consumer loop on Kafka (group `churn-scorer`, topic `events`).

poll a micro-batch -> `BatchProcessor.process` -> dead letters to `events.dlq` -> commit.
A store outage stops committing: the cached states are dropped, the partitions are rewound
to the batch start and the batch is retried with backoff; per-user offsets in the saved
states make the replay exactly-once in effect. Redis errors arrive classified
(`core.redis.classify`): an unreachable or loading Redis is retried quietly; one that refuses
(OOM, READONLY, MISCONF, AUTH) is retried as well, but logged as an error and exported as
`churn_scorer_redis_refusing{reason}` for the alert, never a crash loop.

Redis going back in time (restarted from an append-only file that missed the last second)
is caught by the applied offsets saved with the states: before each batch, every second while
idle, and atomically in the save itself, Redis must hold at least the applied offset this
process last wrote (or, for a partition first seen, the offset Kafka's commit started it at).
Where it holds less, the partition is replayed from the offset Redis holds.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from core.errors import ServiceUnavailableError
from core.gc_policy import freeze_survivors
from core.kafka import kafka_config
from core.redis import redis_client
from core.settings import Settings
from events.schema import ErrorRecord
from features.feast_repo import key_ttl_seconds, open_feature_store
from features.feast_store import FeastFeatureStore
from features.online import OnlineEngine
from features.state_store import NOTHING_APPLIED, RedisStateStore, StateRolledBackError
from models.holder import ModelHolder
from models.registry import CHALLENGER, champion_loader
from monitoring.drift import Thresholds
from monitoring.drift_state import DriftPublisher
from monitoring.metrics import Metrics
from monitoring.performance_state import PerformancePublisher
from stream.at_risk import RedisAtRiskIndex
from stream.changes import KafkaChangeLog, ensure_changes_topic
from stream.kafka import IdempotentProducer, commit_unless_stopped, committing_consumer, dead_letter, report_lag
from stream.outage import StoreOutage
from stream.processor import BatchProcessor, Message, applied_offsets, partition_key
from stream.risk_store import RedisRiskStore
from stream.snapshot import DailySnapshots, RedisActivity
from stream.topics import ensure_topics, keyless_events_warning, producer_clock_warning, recreate_if_deleted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """Micro-batch bounds and housekeeping periods."""

    max_batch: int = 5000
    max_wait_s: float = 0.1
    lag_every_s: float = 5.0
    model_poll_every_s: float = 10.0
    max_backoff_s: float = 5.0
    applied_check_every_s: float = 1.0  # while idle: has Redis gone back in time?


def header_text(text: str, limit: int = 1024) -> bytes:
    """Returns `text` as UTF-8 of at most `limit` bytes: whole when it fits, else its start and
    its last 120 characters (where the parser names the field, "- at `$.level`") around an
    ellipsis, never cutting a character in two."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return encoded
    tail = (" … " + text[-120:]).encode()
    return encoded[: limit - len(tail)].decode("utf-8", "ignore").encode() + tail


def dlq_headers(record: ErrorRecord) -> list[tuple[str, str | bytes | None]]:
    """Returns the DLQ message headers that say why and where a message failed."""
    return [
        ("reason", header_text(record.reason)),
        ("source_topic", record.topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
    ]


class ScoringConsumer:
    """The consume -> process -> dead-letter -> commit loop with rebalance and outage handling."""

    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        models: ModelHolder,
        metrics: Metrics,
        loop: LoopConfig | None = None,
        extra_config: dict[str, Any] | None = None,
        challengers: ModelHolder | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        """`stopping` is set by SIGTERM / SIGINT (`install_signal_handlers`); pass the event the
        processor's change log also watches, so a stop also ends its waits."""
        self.settings = settings
        self.processor = processor
        self.models = models
        self.challengers = challengers  # the challenger (canary and shadow), polled like the champion
        self.metrics = metrics
        self.loop = loop or LoopConfig()
        self.stopping = stopping or threading.Event()
        tuning = {
            "partition.assignment.strategy": "cooperative-sticky",
            "fetch.min.bytes": 1,
            "queued.max.messages.kbytes": 65536,
        }
        self.consumer = committing_consumer(settings, settings.scorer_group, tuning | (extra_config or {}))
        self.dlq = IdempotentProducer(
            kafka_config(settings, **{"acks": "all", "linger.ms": 5}), interrupt=self.stopping
        )
        # Called when the dead letters were not delivered: the topic may have been deleted
        # while this ran (to purge it, say); then it is created again and the batch's retry
        # delivers them. Returns whether it created the topic.
        self.recreate_dlq: Callable[[], bool] = partial(
            recreate_if_deleted, settings, settings.dlq_topic, settings.topic_partitions, self.stopping
        )
        # Per partition (`topic:partition`), the applied offset Redis must hold at least: what
        # this process last saved, or what it found there. Less means Redis went back in time.
        self.expected: dict[str, int] = {}
        self.commit_abandoned = False  # a stop signal came while a commit waited for Kafka

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", [p.partition for p in partitions])
        if (warning := keyless_events_warning(self.settings, [p.partition for p in partitions])) is not None:
            log.warning(warning)
        self.processor.partitions_changed([p.partition for p in partitions], [])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Batches are committed synchronously before the next poll, so nothing is pending here;
        # dropping the cache makes states reload from Redis on first sight after reassignment.
        log.info("revoked %s", [p.partition for p in partitions])
        self.processor.forget()
        for p in partitions:
            self.expected.pop(partition_key(p.topic, p.partition), None)
        self.processor.partitions_changed([], [p.partition for p in partitions])

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT end the loop after the current batch and leave the group (a batch still
        waiting for Kafka's acknowledgements, or a commit waiting for a broker, is abandoned and
        replayed after the restart: docs/invariants.md, 13); SIGUSR1 writes every thread's stack
        to stderr (where a scorer that stopped moving is stuck)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def run(self, *, max_idle_s: float | None = None) -> None:
        """Consumes until stopped (or until `max_idle_s` passes with no messages)."""
        self.consumer.subscribe([self.settings.events_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._refresh_models()
        # Wired and subscribed: ready until a batch finds a store down (see ChurnScorerNotReady).
        self.metrics.scorer_ready.set(1)
        freeze_survivors()  # start-up's imports and clients: never walked by the collector again
        last_lag = last_model = last_message = last_check = time.monotonic()
        outage = StoreOutage(self.metrics, self.loop.max_backoff_s)
        cpu = self.processor.cpu
        cpu.start()
        try:
            while not self.stopping.is_set():
                raw = self._next_batch()
                now = time.monotonic()
                messages = self._messages(raw)
                cpu.mark("consume")
                if messages:
                    last_message = last_check = now
                    self._handle(messages, now, outage)
                    if self.stopping.is_set():
                        break  # stopped in the batch or its backoff: no lag report against a dead Kafka
                else:
                    if outage.ongoing:
                        outage.moved((p.topic, p.partition) for p in self.consumer.assignment())
                    if self.expected and now - last_check > self.loop.applied_check_every_s:
                        last_check = now
                        try:
                            self._check_applied([])
                        except ServiceUnavailableError as exc:  # the next batch meets it, with backoff
                            log.info("could not check the applied offsets while idle: %s", exc)
                    if max_idle_s is not None:
                        if not self.consumer.assignment():
                            last_message = now  # the idle clock runs only while partitions are assigned
                        elif now - last_message > max_idle_s:
                            break
                if now - last_model > self.loop.model_poll_every_s:
                    self._refresh_models()
                    last_model = now
                if now - last_lag > self.loop.lag_every_s:
                    self.report_lag()
                    last_lag = now
                cpu.mark("housekeeping")
                cpu.flush()
        finally:
            if self.commit_abandoned:
                # The abandoned commit still holds the consumer; closing it under that call is
                # unsafe, and leaving the group needs a broker anyway: the group notices this
                # member's departure after the session timeout.
                log.warning("the Kafka consumer is left unclosed (its commit is still waiting for a broker)")
            else:
                self.consumer.close()
            # Dead letters still queued belong to a batch that was not committed (a batch's
            # letters are acknowledged before its commit): it is replayed after a restart, so
            # after a stop signal this waits one slice, not 10 s.
            self.dlq.flush(10)

    def _handle(self, messages: list[Message], now: float, outage: StoreOutage) -> None:
        """Applies one batch, or rewinds it: to what Redis holds when that is behind (the replay
        comes in the next batches), or for a retry after an outage's backoff. Returns either
        way, so the loop's housekeeping (the lag above all, which grows most in an outage, and
        the model poll) runs after every batch."""
        cpu = self.processor.cpu
        try:
            applied_ok = self._check_applied(messages)
            cpu.mark("offset_check")
            if not applied_ok:
                return
            self._process(messages)
            freeze_survivors()  # the batch's survivors (user states mostly)
            cpu.mark("gc")
            outage.applied(time.monotonic())
        except StateRolledBackError as exc:  # Redis restarted from older files while the batch ran
            self._replay(exc.behind, messages)
        except ServiceUnavailableError as exc:
            wait = outage.failed(exc, now, {(m.topic, m.partition) for m in messages})
            self._rewind(messages)
            self.stopping.wait(wait)

    def _refresh_models(self) -> None:
        self.models.refresh()
        if self.challengers is not None:
            self.challengers.refresh()

    def _next_batch(self) -> list[Any]:
        """Returns the next batch: what is already fetched if anything is, else what arrives
        within `max_wait_s`. librdkafka's `consume` waits out its timeout unless `max_batch`
        messages are there, so always passing the timeout added up to that wait to every batch
        of a loop that was already behind (measured at 10,000 events/s: p50 freshness 0.3 s)."""
        raw = self.consumer.consume(self.loop.max_batch, 0)
        return raw or self.consumer.consume(self.loop.max_batch, self.loop.max_wait_s)

    @staticmethod
    def _messages(raw: list[Any]) -> list[Message]:
        """Returns the consumed messages that are not errors; logs the errors (but end of partition)."""
        messages = []
        for m in raw:
            error = m.error()
            if error is None:
                messages.append(
                    Message(m.value() or b"", m.topic(), m.partition(), m.offset(), m.timestamp()[1], m.key())
                )
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", error)
        return messages

    def _process(self, messages: list[Message]) -> None:
        with self.metrics.batch_seconds.time():
            result = self.processor.process(messages, self.expected)
            self.expected.update(applied_offsets(messages))  # Redis holds them now
            if result.dead_letters:  # acknowledged before the commit, or the batch is retried
                dead = result.dead_letters
                messages_out = (dead_letter(r.raw, dlq_headers(r)) for r in dead)
                try:
                    self.dlq.deliver(self.settings.dlq_topic, messages_out, 30, "dead letter(s)")
                except ServiceUnavailableError:
                    self.recreate_dlq()
                    raise
                self.metrics.dlq_total.inc(len(dead))
            self.processor.count_unapplied(result)
            self.metrics.batch_events.observe(len(messages))
            # Commit the next offset to read per partition, only now that every write is done.
            # A partition's messages arrive in offset order, so its last one in the batch is its end.
            # Synchronously: an asynchronous commit (tried after a CI run where a scorer stopped
            # after a broker restart) leaves almost no moment between a batch's save and its
            # commit, the crash the SIGKILL tests aim at; a scorer that hangs is diagnosed from
            # the stacks SIGUSR1 dumps (the test harness sends it) before changing this again.
            ends = {(m.topic, m.partition): m.offset for m in messages}
            try:
                offsets = [TopicPartition(t, p, o + 1) for (t, p), o in ends.items()]
                if not commit_unless_stopped(self.consumer, offsets, self.stopping):
                    # Stopped while no broker answers. Every write is done and each user's state
                    # carries its applied offsets, so the batch replayed after the restart is skipped.
                    self.commit_abandoned = True
                    log.warning("stopped while the offset commit waited for Kafka: the batch is replayed and skipped")
            except KafkaException as exc:
                # A rebalance moved partitions while this batch was in flight (e.g. ILLEGAL_GENERATION),
                # or the broker went away with the commit in flight. Every write is done and each
                # user's state carries its applied offsets, so whoever re-reads from the last commit
                # (a new owner, or this process after a restart) skips what this batch applied.
                self.metrics.commit_failures_total.inc()
                log.warning("offset commit refused (%s); the next owner of these partitions will skip them", exc)
                self.processor.forget()
            self.processor.cpu.mark("commit")

    def _check_applied(self, messages: list[Message]) -> bool:
        """Compares the applied offsets Redis holds with what it must hold: this process's last
        save, or for a partition first seen in `messages` its first offset there (where Kafka's
        commit started it). Returns True if Redis is not behind; else replays (`_replay`) the
        partitions from what Redis holds and returns False (the batch must be dropped).

        Raises:
            ServiceUnavailableError: Redis cannot be read.
        """
        firsts: dict[str, int] = {}
        for m in messages:
            firsts.setdefault(partition_key(m.topic, m.partition), m.offset)
        stored = self.processor.states.applied(sorted(set(self.expected) | set(firsts)))
        behind = {p: have for p, have in stored.items() if have < self.expected.get(p, firsts.get(p, -1))}
        if behind:
            self._replay(behind, messages, firsts)
            return False
        self.expected.update(stored)
        return True

    def _replay(self, behind: dict[str, int], messages: list[Message], firsts: dict[str, int] | None = None) -> None:
        """Drops the batch and its cached states and seeks each partition in `behind` back to the
        applied offset Redis holds (the earliest retained offset if it holds none)."""
        self._rewind(messages)
        for key, have in behind.items():
            topic, _, partition = key.rpartition(":")
            known = self.expected.get(key)
            if known is None and have == NOTHING_APPLIED:
                log.info(
                    "Redis holds no applied offset for %s (a new deployment or state layout, or Redis lost its "
                    "data): reading it from the earliest retained offset; per-user offsets skip what states hold",
                    key,
                )
            else:
                self.metrics.redis_rollbacks_total.inc()
                log.warning(
                    "Redis went back in time on %s: it holds applied offset %d, this scorer expected %d; "
                    "replaying the partition from Kafka",
                    key,
                    have,
                    known if known is not None else (firsts or {}).get(key, -1),
                )
            target = have if have != NOTHING_APPLIED else OFFSET_BEGINNING
            try:
                self.consumer.seek(TopicPartition(topic, int(partition), target))
            except KafkaException:  # revoked meanwhile: its new owner checks it itself
                log.info("could not rewind %s; it is no longer assigned", key)
                self.expected.pop(key, None)
                continue
            self.expected[key] = have

    def _rewind(self, messages: list[Message]) -> None:
        """Forgets cached states and seeks each partition back to the batch's first offset."""
        self.processor.forget()
        starts: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic, m.partition)
            starts[key] = min(starts.get(key, m.offset), m.offset)
        for (topic, partition), offset in starts.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException:  # the partition may have been revoked meanwhile; its new owner re-reads it
                log.info("could not rewind %s[%d]; it is no longer assigned", topic, partition)

    def report_lag(self) -> None:
        """Sets the lag gauge per assigned partition (high watermark minus position)."""
        report_lag(self.consumer, self.metrics.consumer_lag)


def build_scorer(settings: Settings, metrics: Metrics | None = None) -> ScoringConsumer:
    """Wires one scorer process: Redis, Feast, the online engine, the champion model, Kafka
    (events, dead letters, tier changes), the at-risk list.

        Raises:
            ConfigError: the Feast repo was not applied (`churn feast-apply`).
            ServiceUnavailableError: Redis or Kafka cannot be reached.
    """

    metrics = metrics or Metrics()
    ensure_topics(settings)
    if (warning := producer_clock_warning(settings)) is not None:
        log.warning(warning)
    ensure_changes_topic(settings)
    client = redis_client(settings)
    stopping = threading.Event()  # the stop signal, for the loop and the producers' waits alike
    models = ModelHolder(
        *champion_loader(settings), on_swap=metrics.model_swapped("scorer"), on_refuse=metrics.model_refused("scorer")
    )
    # The challenger serves the canary slice and scores every user in shadow (when distinct).
    challengers = ModelHolder(
        *champion_loader(settings, alias=CHALLENGER),
        on_refuse=metrics.model_refused("scorer-challenger"),
        drop_when_unset=True,
    )
    engine = OnlineEngine(lateness_ms=settings.allowed_lateness_seconds * 1000)
    ttl = key_ttl_seconds(settings)
    states = RedisStateStore(client, settings.redis_prefix, engine.state_layout, ttl)
    thresholds = Thresholds(settings.drift_psi_warn, settings.drift_psi_alert)
    snapshots = DailySnapshots(
        RedisActivity(client, settings.redis_prefix),
        states,
        OnlineEngine(lateness_ms=settings.allowed_lateness_seconds * 1000),
        DriftPublisher(thresholds, metrics, client, settings.redis_prefix),
        PerformancePublisher(metrics, client, settings.redis_prefix, settings.gate_min_roc_auc),
        settings.predictions_dir,
        lookback_days=settings.lookback_days,
        min_segment_rows=settings.drift_min_segment_rows,
    )
    snapshots.show_latest()  # a restarted scorer exports the latest figures, not none until midnight
    processor = BatchProcessor(
        engine,
        states,
        FeastFeatureStore(open_feature_store(settings)),
        RedisRiskStore(client, settings.redis_prefix, ttl),
        metrics,
        lambda: models.current,
        max_event_bytes=settings.max_event_bytes,
        max_future_skew_ms=settings.max_future_skew_seconds * 1000,
        key_required=settings.require_event_key,
        snapshots=snapshots,
        changes=KafkaChangeLog(settings, settings.tier_changes_topic, interrupt=stopping),
        at_risk=RedisAtRiskIndex(client, settings.redis_prefix),
        challenger=lambda: challengers.current,
        canary_percent=settings.canary_percent,
    )
    loop = LoopConfig(
        max_batch=settings.max_batch_events,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        model_poll_every_s=settings.model_poll_seconds,
    )
    return ScoringConsumer(settings, processor, models, metrics, loop, challengers=challengers, stopping=stopping)
