"""Faults on the real services (issue #9): Redis outage, Kafka broker restart, poison input,
and the API's security properties
(API overload: `tests/integration/serving/test_overload.py`).

The scorer under test is a real `churn consume` process fed by the product's idempotent
producer while the fault happens; afterwards its final state (feature rows, user states with
their offsets, risk rows) must equal an uninterrupted run over the same topic. Each fault prints
its figures (`FAULT <name>: {...}`, run with `-s`) and stores them in
`<state_dir>/fault-figures.json`. A stopped service is always started again (and waited for)
before the test ends, so the tests after these find every service up.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from fastapi.testclient import TestClient
from pydantic import SecretStr

import serving.auth
from bench.api import _rows
from bench.harness import ScorerProcess, free_port, wait_for
from core.errors import InvalidInputError
from core.kafka import kafka_config
from core.settings import Settings
from features.feast_store import FeastFeatureStore
from infra import local as infra
from models import registry as model_registry
from models.artifact import MODEL_FILE
from serving.app import create_app
from serving.deps import build_deps
from stream.topics import delete_topics, ensure_topics
from tests.support import (
    ROOT,
    Deployment,
    drained,
    in_background,
    kill_mid_batch,
    produce_paced,
    random_events,
    record_figures,
    register_champion,
)
from training import registry

OUTAGE_SECONDS = 12.0  # how long Redis stays down (the issue asks for 10-30 s)
RATE = 500.0  # events/s while a fault happens: the stream is still flowing when it starts and ends


@pytest.fixture(scope="module")
def tracking_uri(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An MLflow store with a champion, shared by the module's deployments."""
    return register_champion(tmp_path_factory.mktemp("champion"), settings)


@pytest.fixture
def deploy(settings: Settings, tracking_uri: str, tmp_path: Path, unique: str) -> Iterator[Callable[..., Deployment]]:
    """Makes deployments named `<role><unique>`; restores Redis and Kafka, then deletes their data."""
    made: list[Deployment] = []

    def make(role: str, topic: str, **extra: Any) -> Deployment:
        made.append(Deployment(settings, tracking_uri, tmp_path, f"{role}{unique}", topic, **extra))
        return made[-1]

    yield make
    _services_back(settings)
    for deployment in made:
        deployment.cleanup()
    delete_topics(settings, sorted({d.settings.dlq_topic for d in made}))


def _services_back(settings: Settings) -> None:
    for name in ("redis", "kafka"):
        if not infra.SERVICES[name][1](settings)[0]:
            infra.start_service(settings, name)


def _retry_delays(scorer: ScorerProcess) -> list[float]:
    """Returns the backoff delays the scorer logged, in order."""
    lines = scorer.log_lines("store unavailable, retrying the batch in ")
    return [float(line.split("retrying the batch in ")[1].split("s:")[0]) for line in lines]


def _finish(scorer: ScorerProcess, produced: int) -> dict[str, int]:
    """Waits until the scorer has applied `produced` events, gives a double application time to
    show, stops it (exit code 0 expected) and returns its event counts."""

    def applied_all() -> bool:
        if scorer.proc.poll() is not None:  # its metrics would read 0 until the timeout
            msg = f"the scorer exited ({scorer.proc.returncode}) before applying {produced} events: {scorer.tail(8000)}"
            raise AssertionError(msg)
        return scorer.events("ok") >= produced

    try:
        wait_for(applied_all, 180, f"the scorer to apply {produced} events")
    except TimeoutError as exc:
        scorer.dump_stacks()  # where it is stuck, for the message
        raise TimeoutError(f"{exc} (applied {scorer.events('ok')}):\n{scorer.tail(8000)}") from None
    time.sleep(1)
    counts = {outcome: scorer.events(outcome) for outcome in ("ok", "duplicate", "late", "invalid")}
    assert scorer.stop() == 0, scorer.log.read_text()[-3000:]
    return counts


# --- Redis outage --------------------------------------------------------------------------


@pytest.mark.soak
@pytest.mark.slow
def test_redis_outage_stops_commits_and_ends_in_the_clean_state(
    settings: Settings, topic: str, deploy: Callable[..., Deployment]
) -> None:
    events = random_events(21, users=40, days=20, per_user=250)
    users = sorted({e.user_id for e in events})
    faulted, clean = deploy("ro", topic), deploy("rc", topic)
    scorer = faulted.start_scorer()
    answers: list[tuple[float, int, str, int]] = []  # (sent at, risk status, detail, ready status)
    stop_polling = threading.Event()
    try:
        producing = in_background(produce_paced, faulted.settings, events, RATE)
        with TestClient(create_app(faulted.settings)) as api:
            risk = f"/users/{users[0]}/risk?explain=false"
            wait_for(lambda: api.get(risk).status_code == 200, 60, "the API to answer for a scored user")

            def poll_api() -> None:
                while not stop_polling.is_set():
                    sent = time.monotonic()
                    answer, ready = api.get(risk), api.get("/health/ready")
                    answers.append((sent, answer.status_code, answer.json().get("detail", ""), ready.status_code))
                    time.sleep(0.1)

            poller = threading.Thread(target=poll_api)
            poller.start()
            # An instance started before `churn infra` saved on SIGTERM would lose its data here.
            redis.Redis.from_url(settings.redis_address).config_set("shutdown-on-sigterm", "save")
            down_at = time.monotonic()
            infra.stop_service(settings, "redis")
            stopped_at = time.monotonic()
            applied_before = scorer.events("ok")  # the batch in flight has failed or is counted by now
            ready_during: set[float | None] = set()
            while time.monotonic() - down_at < OUTAGE_SECONDS:
                ready_during.add(scorer.value("churn_scorer_ready"))
                time.sleep(0.5)
            applied_during = scorer.events("ok")
            restart_at = time.monotonic()
            infra.start_service(settings, "redis")
            up_at = time.monotonic()
            wait_for(lambda: scorer.value("churn_scorer_ready") == 1, 60, "the scorer to be ready")
            scorer_back = time.monotonic() - up_at
            wait_for(lambda: answers[-1][0] > up_at and answers[-1][1] == 200, 60, "the API to answer")
            stop_polling.set()
            poller.join(10)
        report = producing.result(120)
        counts = _finish(scorer, len(events))
    finally:
        stop_polling.set()
        _services_back(settings)
        scorer.stop()

    clean.run_uninterrupted()
    delays = _retry_delays(scorer)
    # Requests sent while Redis was surely down, and the first answer after it was started again.
    outage = [(status, detail, ready) for t, status, detail, ready in answers if stopped_at < t < restart_at]
    api_back = next(t for t, status, _, _ in answers if t > restart_at and status == 200) - restart_at
    stores_back = scorer.log_lines("stores are back: batch applied after")
    record_figures(
        settings,
        "redis_outage",
        {
            "produced": report.sent,
            "applied": counts["ok"],
            "lost": max(report.sent - counts["ok"], 0),
            "double_applied": max(counts["ok"] - report.sent, 0),
            "replays_skipped_as_duplicates": counts["duplicate"],
            "redis_down_seconds": round(up_at - down_at, 1),
            "redis_start_seconds": round(up_at - restart_at, 1),
            "applied_during_outage": applied_during - applied_before,
            "scorer_retries": len(delays),
            "scorer_backoff_seconds": sorted(set(delays)),
            "scorer_log_on_recovery": stores_back[0].split(" INFO ")[-1] if stores_back else None,
            "scorer_ready_seconds_after_redis_answered": round(scorer_back, 2),
            "api_answers_during_outage": {str(s): sum(1 for a in outage if a[0] == s) for s in {a[0] for a in outage}},
            "api_503_detail": next((d for s, d, _ in outage if s == 503), None),
            "api_200_seconds_after_redis_start": round(api_back, 2),
        },
    )
    assert report.failed == 0
    assert report.sent == len(events)
    assert applied_during == applied_before  # nothing is applied (or committed) while Redis is down
    assert 0 in ready_during  # not ready in the metrics ...
    assert len(delays) >= 3  # ... and in the log, retrying with a growing, capped backoff
    assert delays[:3] == [0.1, 0.2, 0.4]
    assert max(delays) <= 5.0
    assert stores_back
    # The API said why while Redis was down, and answered again by itself afterwards.
    assert outage
    assert {status for status, _, _ in outage} == {503}
    assert all("Redis" in detail for _, detail, _ in outage)
    assert {ready for _, _, ready in outage} == {503}
    assert counts["ok"] == len(events)
    assert faulted.final_state(users) == clean.final_state(users)


# --- Kafka broker restart ------------------------------------------------------------------


def _messages_in(settings: Settings, topic: str) -> int:
    """Returns how many messages the topic holds (sum over partitions of high - low watermark)."""
    consumer = Consumer(kafka_config(settings, **{"group.id": f"count-{topic}"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            high - low
            for low, high in (consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions)
        )
    finally:
        consumer.close()


@pytest.mark.soak  # the broker down for tens of seconds: ~50-70 s
@pytest.mark.slow
def test_kafka_broker_restart_loses_and_duplicates_nothing(
    settings: Settings, topic: str, deploy: Callable[..., Deployment]
) -> None:
    events = random_events(22, users=32, days=20, per_user=250)
    users = sorted({e.user_id for e in events})
    faulted, clean = deploy("ko", topic), deploy("kc", topic)
    scorer = faulted.start_scorer()
    acknowledged: list[tuple[float, int]] = []
    try:
        producing = in_background(produce_paced, faulted.settings, events, RATE, acknowledged)
        wait_for(lambda: scorer.events("ok") > 1000, 60, "the scorer to apply events")
        down_at = time.monotonic()
        infra.stop_service(settings, "kafka")
        stopped_at = time.monotonic()
        infra.start_service(settings, "kafka")
        up_at = time.monotonic()
        applied_at_restart = scorer.events("ok")
        wait_for(lambda: scorer.events("ok") > applied_at_restart, 120, "the scorer to apply again", log=scorer.log)
        scorer_back = time.monotonic() - up_at
        report = producing.result(180)
        counts = _finish(scorer, len(events))
    finally:
        _services_back(settings)
        scorer.stop()
    in_topic = _messages_in(settings, topic)
    acked_at_restart = max((n for t, n in acknowledged if t <= up_at), default=0)
    producer_back = next((t - up_at for t, n in acknowledged if t > up_at and n > acked_at_restart), None)

    clean.run_uninterrupted()
    record_figures(
        settings,
        "kafka_broker_restart",
        {
            "produced": report.sent,
            "messages_in_topic": in_topic,
            "applied": counts["ok"],
            "lost": max(report.sent - counts["ok"], 0),
            "double_applied": max(counts["ok"] - report.sent, 0),
            "replays_skipped_as_duplicates": counts["duplicate"],
            "broker_stop_seconds": round(stopped_at - down_at, 1),
            "broker_down_seconds": round(up_at - down_at, 1),
            "producer_recovery_seconds": None if producer_back is None else round(producer_back, 2),
            "scorer_recovery_seconds": round(scorer_back, 2),
        },
    )
    assert report.failed == 0
    assert report.sent == len(events)
    assert in_topic == len(events)  # the idempotent producer's retries wrote nothing twice
    assert counts["ok"] == len(events)
    assert faulted.final_state(users) == clean.final_state(users)


STOP_BOUND_S = 10.0  # before the fix, a stop during a commit waited for as long as the broker was down


@pytest.mark.soak  # the broker down for tens of seconds: ~50-70 s
@pytest.mark.slow
def test_a_stop_signal_while_kafka_is_down_ends_the_scorer_at_once_and_loses_nothing(
    settings: Settings, topic: str, deploy: Callable[..., Deployment]
) -> None:
    """The broker crashes (SIGKILL) while events flow; 2 s later the scorer is stopped (SIGTERM).
    It must exit 0 within `STOP_BOUND_S`, wherever the stop finds it: idle, or in a commit that
    waits for the broker (librdkafka's synchronous commit has no timeout of its own; one run
    before the fix was still in it 60 s after SIGTERM; `tests/unit/stream/test_outage.py` and
    `test_kafka.py` take that path every time). A new scorer started once the broker is back
    must end where an uninterrupted run of the same topic ends: nothing lost or applied twice."""
    events = random_events(23, users=24, days=15, per_user=200)
    users = sorted({e.user_id for e in events})
    faulted, clean = deploy("ks", topic), deploy("kt", topic)
    stopped = faulted.start_scorer()
    restarted: ScorerProcess | None = None
    try:
        producing = in_background(produce_paced, faulted.settings, events, RATE)
        wait_for(lambda: stopped.events("ok") > 1000, 60, "the scorer to apply events")
        infra.kill_service(settings, "kafka")
        time.sleep(2)
        applied_at_stop = stopped.events("ok")
        began = time.monotonic()
        exit_code = stopped.stop(timeout=60)
        stop_seconds = time.monotonic() - began
        infra.start_service(settings, "kafka")
        restarted = faulted.start_scorer()
        report = producing.result(180)
        wait_for(lambda: drained(faulted.settings), 180, "the restarted scorer to apply the whole topic")
        time.sleep(1)  # a double application would show
        replayed = {outcome: restarted.events(outcome) for outcome in ("ok", "duplicate")}
        assert restarted.stop() == 0, restarted.tail()
    finally:
        _services_back(settings)
        stopped.stop()
        if restarted is not None:
            restarted.stop()
    clean.run_uninterrupted()
    in_rows = _events_in_rows(faulted, users)
    record_figures(
        settings,
        "stop_while_kafka_down",
        {
            "events": len(events),
            "applied_before_the_stop": applied_at_stop,
            "stop_seconds": round(stop_seconds, 2),
            "commit_abandoned": bool(stopped.log_lines("stopped while the offset commit waited for Kafka")),
            "restarted": replayed,
            "applied": in_rows,
        },
    )
    assert exit_code == 0, stopped.tail(3000)
    assert stop_seconds <= STOP_BOUND_S, stopped.tail(3000)
    assert 0 < applied_at_stop < len(events)  # stopped mid-stream
    assert report.failed == 0
    assert in_rows == len(events)
    assert faulted.final_state(users) == clean.final_state(users)


# --- poison input --------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024
MAX_EVENT_BYTES = 64 * 1024
VALID = {
    "ts": 1_767_225_600_000,
    "userId": "p1",
    "sessionId": 1,
    "itemInSession": 0,
    "page": "NextSong",
    "auth": "Logged In",
    "level": "free",
    "length": 200.0,
}


def _event(**change: Any) -> bytes:
    return json.dumps({**VALID, **change}).encode()


TEN_MB_EVENT = _event(song="x" * TEN_MB)


# (kind, message, what its DLQ reason must say)
POISON: list[tuple[str, bytes, str]] = [
    ("truncated JSON", _event()[:40], "malformed JSON"),
    ("not an object", b"[1, 2, 3]", "expected a JSON object"),
    ("binary", bytes(range(256)) * 4, "malformed JSON"),
    ("invalid UTF-8", _event(song="x").replace(b'"x"', b'"\xff\xfe"'), "malformed JSON"),
    ("NaN", _event().replace(b"200.0", b"NaN"), "malformed JSON"),
    ("deeply nested", _event()[:-1] + b', "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested too deeply"),
    ("over max bytes", _event(song="x" * (MAX_EVENT_BYTES + 1)), "exceeds the limit"),
    ("10 MB string", TEN_MB_EVENT, "exceeds the limit"),
    ("ts in year 9999", _event(ts=253_402_300_799_000), "$.ts"),
    ("negative length", _event(length=-1.0), "$.length"),
    ("session id beyond int64", _event(sessionId=10**30), "$.sessionId"),
    ("negative item", _event(itemInSession=-1), "$.itemInSession"),
    ("absurd status", _event(status=10**6), "$.status"),
    ("user id of 1,000 characters", _event(userId="u" * 1000), "$.userId"),
    ("user id as object", _event(userId={"$ne": ""}), "$.userId"),
    ("missing page", json.dumps({k: v for k, v in VALID.items() if k != "page"}).encode(), "page"),
]
# 600 MB of poison: well past what the scorer's buffers and its allocator hold at their peak (measured
# ~350 MB over its resting RSS), so a memory that followed the input would show in the second half.
TEN_MB_COPIES = 60


def _read_dlq(settings: Settings, topic: str, expected: int) -> list[tuple[bytes, dict[str, str]]]:
    consumer = Consumer(kafka_config(settings, **{"group.id": f"dlq-{topic}", "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    out: list[tuple[bytes, dict[str, str]]] = []
    deadline = time.monotonic() + 60
    while len(out) < expected and time.monotonic() < deadline:
        msg = consumer.poll(1)
        if msg is not None and msg.error() is None:
            headers = {str(k): bytes(v or b"").decode() for k, v in msg.headers() or []}  # type: ignore[str-unpack, arg-type]
            out.append((msg.value() or b"", headers))
    consumer.close()
    return out


def _note_position(where: dict[tuple[int, int], str], kind: str) -> Callable[[Any, Any], None]:
    """Returns a delivery callback that notes the (partition, offset) a poison message landed at."""

    def note(_error: Any, message: Any) -> None:
        where[(message.partition(), message.offset())] = kind

    return note


@pytest.mark.soak
@pytest.mark.slow
def test_poison_is_dead_lettered_with_bounded_memory_and_no_crash(
    settings: Settings, unique: str, deploy: Callable[..., Deployment]
) -> None:
    # A topic that accepts 10 MB messages: the scorer, not the broker, must refuse them.
    topic = f"test-poison-{unique}"
    admin = AdminClient(kafka_config(settings))
    config = {"max.message.bytes": str(16 * 1024 * 1024)}
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1, config=config)])[topic].result(30)
    deployment = deploy("poison", topic, max_event_bytes=MAX_EVENT_BYTES)
    copies = [(f"10 MB string #{i}", TEN_MB_EVENT, "exceeds the limit") for i in range(2, TEN_MB_COPIES + 1)]
    poison = POISON + copies
    valid = random_events(23, users=10, days=5, per_user=20)
    where: dict[tuple[int, int], str] = {}
    producer = Producer(kafka_config(settings, **{"enable.idempotence": True, "message.max.bytes": 16 << 20}))
    scorer = deployment.start_scorer()
    # Partitions assigned (the lag gauge appears), model loaded: the memory of a scorer at rest.
    wait_for(lambda: any(k[0] == "churn_consumer_lag_messages" for k in scorer.samples()), 60, "assignment")
    at_rest = scorer.rss_bytes()
    samples: list[tuple[int, int]] = []  # (poison messages counted, RSS)
    sampling = threading.Event()

    def sample_memory() -> None:
        while not sampling.is_set() and scorer.proc.poll() is None:
            samples.append((scorer.events("invalid"), scorer.rss_bytes()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    try:
        for kind, raw, _ in poison:
            producer.produce(topic, raw, key=kind.encode(), on_delivery=_note_position(where, kind))
            producer.poll(0)
        for event in valid:  # the stream goes on after the poison
            producer.produce(topic, event.to_json(), key=event.user_id.encode())
        assert producer.flush(60) == 0
        wait_for(lambda: scorer.events("invalid") >= len(poison), 120, "the poison to be dead-lettered")
        counts = _finish(scorer, len(valid))
    finally:
        sampling.set()
        sampler.join(10)
        scorer.stop()
        delete_topics(settings, [topic])

    dead = _read_dlq(settings, deployment.settings.dlq_topic, len(poison))
    reasons = {where[(int(h["source_partition"]), int(h["source_offset"]))]: h["reason"] for _, h in dead}
    poison_bytes = sum(len(raw) for _, raw, _ in poison)
    half = len(poison) // 2
    first_half = max(rss for counted, rss in samples if counted < half)
    second_half = max(rss for counted, rss in samples if counted >= half)
    record_figures(
        settings,
        "poison_input",
        {
            "poison_messages": len(poison),
            "poison_bytes": poison_bytes,
            "dead_lettered": len(dead),
            "counted_invalid": counts["invalid"],
            "valid_after_poison_applied": counts["ok"],
            "largest_dlq_message_bytes": max(len(value) for value, _ in dead),
            "rss_at_rest_mb": round(at_rest / 2**20),
            "rss_peak_first_half_mb": round(first_half / 2**20),
            "rss_peak_second_half_mb": round(second_half / 2**20),
            "memory_samples": len(samples),
            "reasons": {kind: reason[:100] for kind, reason in reasons.items() if "#" not in kind},
        },
    )
    assert counts["invalid"] == len(poison)
    assert counts["ok"] == len(valid)
    assert len(dead) == len(poison)
    assert set(reasons) == {kind for kind, _, _ in poison}
    for kind, _, expected in poison:
        assert expected in reasons[kind], (kind, reasons[kind])
    assert all({"source_topic", "source_partition", "source_offset"} <= set(h) for _, h in dead)
    assert max(len(value) for value, _ in dead) <= MAX_EVENT_BYTES  # the DLQ keeps a bounded prefix
    # Memory does not follow the input: memory that held on to the second half (~300 MB) would
    # raise the first half's peak by that much; it may move by the noise of buffers and allocator.
    assert second_half - first_half < poison_bytes / 6, (first_half, second_half)
    assert max(first_half, second_half) - at_rest < poison_bytes / 2, (first_half, second_half, at_rest)


@pytest.mark.soak  # two scorer runs over the same messages (the reference and the deletion's)
@pytest.mark.slow
def test_a_dead_letter_topic_deleted_while_the_scorer_runs_is_created_again(
    settings: Settings, unique: str, deploy: Callable[..., Deployment]
) -> None:
    """An operator deletes the dead-letter topic (to purge it, say) while the scorer runs, then a
    bad event comes. The scorer's delivery of its letter fails (the broker no longer knows the
    topic; topics are never created automatically): it must create the topic again and go on,
    not retry that batch until a restart. The end state equals an undisturbed run of the same
    messages, and the letter is in the new topic."""
    valid = random_events(31, users=20, days=5, per_user=20)
    half = len(valid) // 2
    first_bad, second_bad = b'{"userId": "u1", "page": ', b'{"not": "an event"}'
    messages = [(e.to_json(), e.user_id.encode()) for e in valid[:half]] + [(first_bad, b"bad-1")]
    after = [(second_bad, b"bad-2")] + [(e.to_json(), e.user_id.encode()) for e in valid[half:]]
    users = sorted({e.user_id for e in valid})

    reference = deploy("dlqref", f"test-dlqref-{unique}")
    ensure_topics(reference.settings)
    _produce_raw(settings, reference.settings.events_topic, messages + after)
    reference.run_uninterrupted()

    deployment = deploy("dlqgone", f"test-dlqgone-{unique}")
    scorer = deployment.start_scorer()
    try:
        _produce_raw(settings, deployment.settings.events_topic, messages)
        wait_for(lambda: scorer.events("invalid") == 1 and scorer.events("ok") == half, 120, "the first half")
        delete_topics(settings, [deployment.settings.dlq_topic])
        deleted_at = time.monotonic()
        _produce_raw(settings, deployment.settings.events_topic, after)
        # The batch's states are saved before its letters go out, so its events count as
        # applied at once; the letter (counted once delivered) and the commit wait for the topic.
        wait_for(lambda: scorer.events("invalid") == 2, 120, "the second letter to be delivered")
        wait_for(partial(drained, deployment.settings), 60, "the topic to be committed to its end")
        seconds = time.monotonic() - deleted_at
        ready = scorer.value("churn_scorer_ready")
        counts = _finish(scorer, len(valid))
        recreated = scorer.log_lines("was gone (deleted while this process ran?): created it again")
    finally:
        with contextlib.suppress(Exception):
            scorer.stop()
    dead = _read_dlq(settings, deployment.settings.dlq_topic, 1)
    record_figures(
        settings,
        "dead_letter_topic_deleted",
        {"seconds_to_the_letter_delivered_and_committed": round(seconds, 1), **counts},
    )

    assert recreated
    # The broker said the topic was gone: not learned by waiting out the 30 s acknowledgement
    # wait (31-32 s from the deletion before `UNKNOWN_TOPIC_AFTER_MS`).
    assert seconds < 20, seconds
    assert ready == 1
    assert [value for value, _ in dead] == [second_bad]  # the first went with the deleted topic
    assert counts["invalid"] == 2
    assert counts["ok"] + counts["duplicate"] >= len(valid)  # the failed batch was retried whole
    assert deployment.final_state(users) == reference.final_state(users)


def _produce_raw(settings: Settings, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
    """Publishes (value, key) pairs to `topic` in order with an idempotent producer."""
    producer = Producer(kafka_config(settings, **{"enable.idempotence": True}))
    for value, key in messages:
        producer.produce(topic, value, key=key)
    assert producer.flush(60) == 0


# --- security ------------------------------------------------------------------------------


class _Spy:
    """Wraps a store and records every call that would reach Redis."""

    def __init__(self, store: Any, calls: list[str]) -> None:
        self._store = store
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self._calls.append(f"{name}{args}")
            return method(*args, **kwargs)

        return recorded


# Refused (422) before anything reaches Redis: too long, or a control character (CR LF, NUL, TAB).
BAD_IDS = ["u" * 65, "a%0d%0aSET%20x%201", "%00", "a%09b"]
# Odd but valid (the stream scores such ids): looked up as themselves, unknown here (404). Redis
# keys are binary-safe and sent length-prefixed, and the hash tag comes first in every user key.
ODD_IDS = ["two words", "a*", "é", "a;b", "a\\b", "{u}", "SET x 1"]


def test_api_keys_ids_and_bodies_are_checked_and_keys_never_logged(
    settings: Settings, topic: str, deploy: Callable[..., Deployment], caplog: pytest.LogCaptureFixture
) -> None:
    keys = ["key-0123456789abcdef", "another-secret-key-that-is-long"]
    deployment = deploy("sec", topic, api_keys=[SecretStr(k) for k in keys])
    user = "sec-user"

    FeastFeatureStore(deployment.feast).write_rows([dataclasses.replace(_rows(1)[0], user_id=user)])
    deps = build_deps(deployment.settings)
    reads: list[str] = []
    deps.service.features = _Spy(deps.service.features, reads)
    deps.service.risks = _Spy(deps.service.risks, reads)
    together = deps.service.read_together  # the features and risk rows in one round trip
    if together is not None:

        def read_together(ids: Sequence[str]) -> Any:
            reads.append(f"read_together{ids}")
            return together(ids)

        deps.service.read_together = read_together
    compared: list[tuple[int, int]] = []

    real_compare = serving.auth.hmac.compare_digest

    def recording_compare(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real_compare(a, b)

    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(deployment.settings, deps)) as api:
        serving.auth.hmac.compare_digest = recording_compare  # type: ignore[assignment]
        try:
            good = {"X-API-Key": keys[1]}
            attempts = [good, {"Authorization": f"Bearer {keys[0]}"}]
            attempts += [{"X-API-Key": wrong} for wrong in ("k", keys[0][:-1], keys[0] + "x", "x" * 10_000)]
            for headers in attempts:
                compared.clear()
                answer = api.get(f"/users/{user}/risk", headers=headers)
                assert answer.status_code == (200 if headers in attempts[:2] else 401)
                assert keys[0][:-1] not in answer.text
                # Every key is compared, whatever matched and whatever the length given: equal-length digests.
                assert compared == [(32, 32)] * len(keys)
        finally:
            serving.auth.hmac.compare_digest = real_compare

        reads.clear()
        for bad in BAD_IDS:
            answer = api.get(f"/users/{bad}/risk", headers=good)
            assert answer.status_code == 422, (bad, answer.status_code)
        assert api.post("/users/risk", json={"user_ids": [user, "a\nb"]}, headers=good).status_code == 422
        assert api.post("/users/risk", json={"user_ids": ["u" * 65]}, headers=good).status_code == 422
        assert reads == []  # refused before anything reached Redis
        for odd in ODD_IDS:
            answer = api.get(f"/users/{urllib.parse.quote(odd)}/risk", headers=good)
            assert answer.status_code == 404, (odd, answer.status_code)
            assert "unknown user" in answer.json()["detail"]
        reads.clear()
        batch = api.post("/users/risk", json={"user_ids": ODD_IDS}, headers=good)
        assert batch.status_code == 200, batch.text
        assert all(any(repr(odd) in read for read in reads) for odd in ODD_IDS), reads  # each looked up as itself
        reads.clear()

        big = json.dumps({"user_ids": [user] * 1000, "pad": "x" * deployment.settings.api_max_body_bytes})
        answer = api.post("/users/risk", content=big, headers={**good, "content-type": "application/json"})
        assert answer.status_code == 413
        assert "limit" in answer.json()["detail"]
        chunks = (b" " * 65536 for _ in range(64))  # 4 MiB without a Content-Length
        answer = api.post("/users/risk", content=chunks, headers={**good, "content-type": "application/json"})
        assert answer.status_code == 413
        assert reads == []
        assert api.post("/users/risk", json={"user_ids": [user]}, headers=good).status_code == 200
        assert reads  # the spy does see what reaches the stores

    text = caplog.text + repr(deployment.settings) + str(deployment.settings)
    assert all(key not in text for key in keys)


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_CALLS = {"read_pickle", "load_model", "torch.load", "allow_pickle"}


def test_models_load_only_as_text_from_the_registry(settings: Settings, tmp_path: Path) -> None:
    """No product module can unpickle anything, and a registry version that holds a pickle is
    refused as not a model without running it."""
    root = ROOT
    offenders = []
    for package in ("churn", "features", "monitoring", "serving", "stream", "training"):
        for path in (root / package).rglob("*.py"):
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module.split(".")[0]]
                offenders += [f"{path.name}: import {n}" for n in names if n in PICKLE_MODULES]
            offenders += [f"{path.name}: {call}" for call in PICKLE_CALLS if call in source]
    assert offenders == []

    marker = tmp_path / "unpickled"
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # os.system("touch ...") if unpickled
    (artifact / "model.pkl").write_bytes(payload)
    (artifact / MODEL_FILE).write_bytes(payload)
    scratch = settings.model_copy(
        update={"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "state_dir": tmp_path / "state"}
    )
    run_id, version = registry.log_run(scratch, artifact, {}, {}, {})
    registry.apply_decision(scratch, run_id, version, registry.Decision(True))

    with pytest.raises(InvalidInputError, match="not a churn model artifact"):
        model_registry.load_champion(scratch)
    assert not marker.exists()


# --- Redis crashes and refusals (issue #18) -------------------------------------------------


def _events_in_rows(deployment: Deployment, users: list[str]) -> int:
    """Returns how many events the final feature rows account for (every user's `events_28d`:
    the simulated events span less than 28 days, so each row counts all of its user's events)."""
    rows = FeastFeatureStore(deployment.feast).read_rows(users)
    return sum(int(row.values["events_28d"]) for row in rows if row is not None)


def _applied_beyond(scorer: ScorerProcess, count: int) -> bool:
    return scorer.events("ok") > count


def _refusing(scorer: ScorerProcess, reason: str) -> bool:
    return scorer.value("churn_scorer_redis_refusing", reason=reason) == 1


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_redis_sigkilled_while_events_flow_loses_nothing(
    settings: Settings, topic: str, deploy: Callable[..., Deployment]
) -> None:
    """Redis SIGKILLed (nothing saved on exit) three times while events flow, restarted from its
    own append-only files; then once more restarted from files 2 s older than the crash (what a
    host loss with `appendfsync everysec` leaves): the scorer sees Redis went back in time and
    replays from Kafka. The end state equals an uninterrupted run, and counts every event once."""
    # 32 s of events at RATE: the stream still flows at the fourth kill, after three restarts.
    events = random_events(24, users=40, days=20, per_user=400)
    users = sorted({e.user_id for e in events})
    faulted, clean = deploy("rk", topic), deploy("rkc", topic)
    aof = settings.state_dir.resolve() / "redis" / "appendonlydir"
    older = faulted.folder / "appendonlydir-older"
    scorer = faulted.start_scorer()
    kills: list[dict[str, Any]] = []
    try:
        producing = in_background(produce_paced, faulted.settings, events, RATE)
        for i in range(4):
            applied = scorer.events("ok")
            wait_for(partial(_applied_beyond, scorer, applied + 300), 60, "events to flow")
            from_older = i == 3
            applied_at_copy = scorer.events("ok")
            if from_older:
                shutil.copytree(aof, older)
                time.sleep(2.0)  # the scorer writes on; the copy misses these 2 s
            retries_before = len(_retry_delays(scorer))
            applied_at_kill = scorer.events("ok")
            if from_older:  # the files the restart reads really are older than what was applied
                assert applied_at_kill > applied_at_copy, "no event applied between the copy and the kill"
            infra.kill_service(settings, "redis")
            if from_older:
                shutil.rmtree(aof)
                shutil.copytree(older, aof)
            time.sleep(1.0)
            restarted = time.monotonic()
            infra.start_service(settings, "redis")
            wait_for(lambda: scorer.value("churn_scorer_ready") == 1, 60, "the scorer to be ready again")
            kills.append(
                {
                    "from_older_files": from_older,
                    "applied_before_kill": applied_at_kill,
                    "scorer_retries": len(_retry_delays(scorer)) - retries_before,
                    "redis_start_seconds": round(time.monotonic() - restarted, 2),
                }
            )
        report = producing.result(120)
        rollbacks = scorer.value("churn_scorer_redis_rollbacks_total") or 0  # read before `_finish` stops it
        counts = _finish(scorer, len(events))
    finally:
        _services_back(settings)
        scorer.stop()

    clean_metrics = clean.run_uninterrupted()
    clean_applied = clean_metrics.events_total.labels("ok")._value.get()
    in_rows = _events_in_rows(faulted, users)
    record_figures(
        settings,
        "redis_sigkill",
        {
            "produced": report.sent,
            "kills": kills,
            "applied_in_final_rows": in_rows,
            "applied_by_clean_run": clean_applied,
            "scorer_ok_count_with_replays": counts["ok"],
            "skipped_as_duplicates": counts["duplicate"],
            "partitions_replayed_after_going_back_in_time": rollbacks,
        },
    )
    assert report.failed == 0
    assert report.sent == len(events)
    assert all(kill["scorer_retries"] >= 1 for kill in kills)  # each kill met the scorer writing
    assert rollbacks >= 1  # the restart from older files was seen ...
    assert scorer.log_lines("Redis went back in time on")  # ... and said so
    assert clean_applied == len(events)
    assert in_rows == len(events)  # every event counted once in the final rows
    assert faulted.final_state(users) == clean.final_state(users)


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scorer_and_redis_killed_together_lose_nothing(
    settings: Settings, topic: str, deploy: Callable[..., Deployment]
) -> None:
    """The scorer and Redis SIGKILLed at the same instant, twice, the scorer inside a batch (its
    states saved, its Kafka commit pending), while events flow; both restarted."""
    # 40 s of events at RATE: the stream still flows at the second kill, after two restarts.
    events = random_events(25, users=40, days=20, per_user=500)
    users = sorted({e.user_id for e in events})
    faulted, clean = deploy("sr", topic), deploy("src", topic)
    landed = []
    scorer: ScorerProcess | None = None
    try:
        producing = in_background(produce_paced, faulted.settings, events, RATE)

        def kill_redis() -> None:
            infra.kill_service(settings, "redis")

        for _ in range(2):
            scorer = faulted.start_scorer()
            landed.append(kill_mid_batch(scorer.proc, faulted.settings, also=kill_redis))
            infra.start_service(settings, "redis")
        scorer = faulted.start_scorer()
        report = producing.result(180)
        wait_for(lambda: drained(faulted.settings), 180, "the scorer to apply the whole topic")
        assert scorer.stop() == 0, scorer.tail()
    finally:
        _services_back(settings)
        if scorer is not None:
            scorer.stop()

    clean.run_uninterrupted()
    in_rows = _events_in_rows(faulted, users)
    record_figures(
        settings,
        "scorer_and_redis_sigkill",
        {"produced": report.sent, "kills_inside_a_batch": landed, "applied": in_rows},
    )
    assert report.failed == 0
    assert landed == [True, True]
    assert in_rows == len(events)
    assert faulted.final_state(users) == clean.final_state(users)


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_redis_refusing_writes_gives_not_ready_a_metric_and_a_log_then_recovers(
    settings: Settings, topic: str, deploy: Callable[..., Deployment]
) -> None:
    """Redis answering OOM (`maxmemory 1` with `noeviction`) and then READONLY (a replica of a
    dead host) while events flow: the scorer applies and commits nothing, reports not ready, the
    refusal's code and its failures, logs an error saying why, and carries on once Redis is fixed."""
    events = random_events(26, users=20, days=10, per_user=200)
    users = sorted({e.user_id for e in events})
    faulted, clean = deploy("rf", topic), deploy("rfc", topic)
    admin = redis.Redis.from_url(settings.redis_address)
    dead = free_port()
    faults: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "OOM": (lambda: admin.config_set("maxmemory", 1), lambda: admin.config_set("maxmemory", 0)),
        "READONLY": (lambda: admin.replicaof("127.0.0.1", dead), lambda: admin.replicaof("NO", "ONE")),
    }
    scorer = faulted.start_scorer()
    seen: dict[str, dict[str, Any]] = {}
    try:
        producing = in_background(produce_paced, faulted.settings, events, RATE)
        for reason, (refuse, fix) in faults.items():
            applied = scorer.events("ok")
            wait_for(partial(_applied_beyond, scorer, applied + 200), 60, "events to flow")
            refuse()
            wait_for(partial(_refusing, scorer, reason), 30, f"the scorer to report {reason}")
            held, refused_at = scorer.events("ok"), time.monotonic()
            # Retried (a second failed attempt of the same batch), and nothing applied meanwhile.
            wait_for(lambda: (scorer.value("churn_scorer_store_failures") or 0) >= 2, 30, f"a retry under {reason}")
            time.sleep(1.0)  # a few more attempts at the backoff's pace
            seen[reason] = {
                "ready": scorer.value("churn_scorer_ready"),
                "consecutive_failures": scorer.value("churn_scorer_store_failures"),
                "applied_while_refused": scorer.events("ok") - held,
                "refused_seconds": round(time.monotonic() - refused_at, 2),
            }
            fix()
            fixed = time.monotonic()
            wait_for(lambda: scorer.value("churn_scorer_ready") == 1, 60, "the scorer to recover")
            seen[reason]["recovered_seconds"] = round(time.monotonic() - fixed, 2)
            seen[reason]["refusing_after"] = scorer.value("churn_scorer_redis_refusing", reason=reason)
            seen[reason]["log"] = scorer.log_lines(f"Redis refuses the scorer's writes ({reason})")[:4]
        report = producing.result(120)
        counts = _finish(scorer, len(events))
    finally:
        faults["OOM"][1]()
        faults["READONLY"][1]()
        admin.close()
        scorer.stop()

    clean.run_uninterrupted()
    record_figures(settings, "redis_refusing_writes", {"produced": report.sent, "applied": counts["ok"], **seen})
    for reason, figures in seen.items():
        assert figures["ready"] == 0, reason
        assert (figures["consecutive_failures"] or 0) >= 2, reason  # retried, with backoff ...
        assert figures["applied_while_refused"] == 0, reason  # ... and nothing applied meanwhile
        assert figures["refusing_after"] == 0, reason
        assert figures["log"], reason
        assert " ERROR " in figures["log"][0], reason
    assert counts["ok"] == len(events)
    assert faulted.final_state(users) == clean.final_state(users)


# --- a scorer that loses its partitions during an outage --------------------------------------


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_scorer_whose_partition_moved_during_an_outage_is_ready_again_and_nothing_is_lost(
    settings: Settings, unique: str, deploy: Callable[..., Deployment]
) -> None:
    """Two scorers in one group on a one-partition topic; Redis is stopped while scorer A owns
    the partition and retries a batch; A is frozen (SIGSTOP) past its session timeout, so the
    partition moves to B, which retries the batch in turn. Thawed, A rejoins with no partition:
    it must report ready again while Redis is still down (it has nothing failing), B must not,
    and after Redis returns the end state equals an uninterrupted run."""
    topic = f"test-events-one-{unique}"
    events = random_events(25, users=20, days=10, per_user=100)
    users = sorted({e.user_id for e in events})
    first, rest = events[: len(events) // 2], events[len(events) // 2 :]
    faulted = deploy("mv", topic, topic_partitions=1)
    clean = deploy("mvc", topic, topic_partitions=1)
    a = faulted.start_scorer()
    b = faulted.start_scorer(metrics_port=free_port())
    figures: dict[str, Any] = {}
    try:
        assert produce_paced(faulted.settings, first, 5000).failed == 0
        wait_for(partial(drained, faulted.settings), 60, "the first half to be applied")
        owner = a if _owns_the_partition(a) else b  # sticky: the one that got it keeps it
        other = b if owner is a else a
        infra.stop_service(settings, "redis")
        down_at = time.monotonic()
        assert produce_paced(faulted.settings, rest, 5000).failed == 0
        wait_for(lambda: owner.value("churn_scorer_ready") == 0, 60, "the owner to fail a batch")
        assert other.value("churn_scorer_ready") == 1  # idle: nothing of its own is failing

        os.kill(owner.proc.pid, signal.SIGSTOP)  # heartbeats stop: the group moves the partition
        stopped_at = time.monotonic()
        wait_for(partial(_owns_the_partition, other), 60, "the partition to move")
        figures["partition_moved_after_seconds"] = round(time.monotonic() - stopped_at, 2)
        wait_for(lambda: other.value("churn_scorer_ready") == 0, 60, "the new owner to fail the batch")
        os.kill(owner.proc.pid, signal.SIGCONT)
        thawed_at = time.monotonic()
        wait_for(lambda: owner.value("churn_scorer_ready") == 1, 60, "the thawed scorer to be ready")
        figures["thawed_scorer_ready_after_seconds"] = round(time.monotonic() - thawed_at, 2)
        figures["new_owner_ready_meanwhile"] = other.value("churn_scorer_ready")
        figures["redis_still_down"] = not infra.SERVICES["redis"][1](settings)[0]
        figures["log"] = owner.log_lines("moved to another scorer")[:1]

        infra.start_service(settings, "redis")
        figures["redis_down_seconds"] = round(time.monotonic() - down_at, 1)
        wait_for(lambda: other.value("churn_scorer_ready") == 1, 60, "the new owner to recover")
        wait_for(partial(drained, faulted.settings), 120, "the whole topic to be applied")
        time.sleep(1)  # a double application would show in the counts by now
        figures["applied"] = {"thawed": owner.events("ok"), "new_owner": other.events("ok")}
        exits = [owner.stop(), other.stop()]
    finally:
        _services_back(settings)
        for scorer in (a, b):
            if scorer.proc.poll() is None:
                os.kill(scorer.proc.pid, signal.SIGCONT)
            scorer.stop()
    try:
        clean.run_uninterrupted()
        in_rows = _events_in_rows(faulted, users)
        states = faulted.final_state(users), clean.final_state(users)
    finally:
        delete_topics(settings, [topic, f"{topic}.changes", f"{topic}.changes.dlq"])
    record_figures(settings, "partition_moved_during_outage", figures)
    assert exits == [0, 0]
    assert figures["redis_still_down"]
    assert figures["new_owner_ready_meanwhile"] == 0  # it holds the batch that still fails
    assert figures["log"]
    assert in_rows == len(events)  # every event counted once
    assert states[0] == states[1]


def _owns_the_partition(scorer: ScorerProcess) -> bool:
    """Returns whether the scorer holds partition 0, from its log: with cooperative rebalancing
    each `assigned [...]` / `revoked [...]` line names only the partitions added or taken away."""
    owned: set[str] = set()
    for line in scorer.log_lines("INFO stream.consumer "):
        for verb in ("assigned", "revoked"):
            if f" {verb} [" in line:
                listed = set(filter(None, line.rsplit("[", 1)[1].rstrip("]").split(", ")))
                owned = owned | listed if verb == "assigned" else owned - listed
    return "0" in owned
