"""The stream benchmark's fair naive baseline: what a careful user writes with the stock tools.

One message at a time, with the same engine, model and stores as the scorer: parse the event,
load the user's state from Redis, apply the event, build the user's row, predict that row,
write the risk row, save the state. Feature rows go to Feast in small batches: every
`WRITE_EVERY` messages, one `store.push` (Feast's documented write, which calls
`write_to_online_store`) of the latest row of each user touched since the last. (A push per
message costs ~37 ms of CPU per event here, so 20,000 events would take most of an hour: the
batched push is what a careful user does.) No read is done only to be thrown away. Offsets
are committed as confluent-kafka's documentation recommends for at-least-once processing:
synchronously, after the writes of the messages they cover (every `WRITE_EVERY` messages,
its `MIN_COMMIT_COUNT` pattern), not per message. Guests are skipped and not counted.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Final

from confluent_kafka import Message as KafkaMessage

from core.settings import Settings
from events.schema import Event, parse_event
from features.online import APPLIED, STATE_ENCODER, OnlineEngine
from features.store import FeatureRow
from models.runtime import feature_matrix
from stream.kafka import committing_consumer
from stream.risk_store import RiskRow

WRITE_EVERY: Final = 100


def naive_consume(
    settings: Settings,
    store: Any,
    states: Any,
    risks: Any,
    model: Any,
    version: str,
    *,
    events: int,
    warmup: int,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Runs the baseline (see the module doc) on `settings.events_topic` in group
    `settings.scorer_group`: `warmup` messages untimed, then `events` logged-in events timed.
    `store` needs `push_rows` (the Feast push path); `states` and `risks` are the scorer's stores.

    Returns:
        Logged-in events/s and CPU microseconds per event of this process over the timed part.

    Raises:
        ServiceUnavailableError: Kafka or Redis cannot be reached.
    """
    engine = OnlineEngine(lateness_ms=settings.allowed_lateness_seconds * 1000)
    consumer = committing_consumer(settings, settings.scorer_group)
    consumer.subscribe([settings.events_topic])
    seen = timed = guests = 0
    started = cpu_started = 0.0
    pending: dict[str, FeatureRow] = {}  # latest row per user since the last push
    since_commit = 0
    deadline = time.monotonic() + timeout_s
    try:
        while timed < events and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            if seen == warmup:
                started, cpu_started = time.perf_counter(), _cpu()
            seen += 1
            if _process(message, engine, pending, states, risks, model, version):
                timed += seen > warmup
            elif seen > warmup:
                guests += 1
            since_commit += 1
            if since_commit >= WRITE_EVERY:
                store.push_rows(list(pending.values()))
                pending.clear()
                consumer.commit(asynchronous=False)
                since_commit = 0
        if since_commit:  # committing with nothing new raises _NO_OFFSET
            store.push_rows(list(pending.values()))
            consumer.commit(asynchronous=False)
        elapsed, cpu = time.perf_counter() - started, _cpu() - cpu_started
    finally:
        consumer.close()
    return {
        "events": timed,
        "warmup_messages": warmup,
        "guests_skipped": guests,
        "seconds": round(elapsed, 2),
        "events_per_second": round(timed / elapsed, 1) if elapsed else 0.0,
        "cpu_us_per_event": round(1e6 * cpu / timed, 1) if timed else None,
        "complete": timed >= events,
        "per_message": "parse, state load, apply, row, predict (1 row), risk write, state save; every "
        f"{WRITE_EVERY} messages: store.push of the touched users' rows, then a synchronous commit",
    }


def _process(
    message: KafkaMessage,
    engine: OnlineEngine,
    pending: dict[str, FeatureRow],
    states: Any,
    risks: Any,
    model: Any,
    version: str,
) -> bool:
    """Applies one message (its feature row goes to `pending`); returns False for a guest or an
    invalid message (nothing written)."""
    event = parse_event(message.value() or b"")
    if type(event) is not Event:
        return False
    user = event.user_id
    engine.states.clear()  # one user at a time: the state comes from Redis, as a stateless worker's would
    engine.states.update(states.load([user]))
    if engine.apply(event, message.partition() or 0, message.offset() or 0) == APPLIED:
        row = engine.row(user)
        pending[user] = row
        p = float(model.predict(feature_matrix([row]))[0])
        risks.write([RiskRow(user, p, model.tier(p), version, row.last_event_ms, time.time_ns() // 1_000_000)])
    states.save({user: STATE_ENCODER.encode(engine.states[user])}, {}, {})
    return True


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
