"""Issue 3's round trip: simulate, produce to the real broker, read back in per-user order."""

from __future__ import annotations

from datetime import UTC, datetime

from confluent_kafka import Consumer

from core.kafka import kafka_config
from core.settings import Settings
from events.schema import Event, parse_event
from sim.simulator import SimConfig, simulate
from stream.producer import publish_lines


def test_simulated_events_round_trip_in_per_user_order(settings: Settings, topic: str, unique: str) -> None:
    sim = simulate(SimConfig(users=60, days=5, start=datetime(2026, 1, 1, tzinfo=UTC), seed=3))
    lines = [line.encode() for line in sim.events.write_ndjson().splitlines()]
    local = settings.model_copy(update={"events_topic": topic, "dlq_topic": f"{topic}.dlq"})
    report = publish_lines(local, lines)
    assert report.failed == 0
    assert report.malformed == 0
    assert report.sent == len(lines)

    consumer = Consumer(kafka_config(settings, **{"group.id": f"rt-{unique}", "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    received: list[tuple[bytes, bytes]] = []
    try:
        while len(received) < len(lines):
            msg = consumer.poll(10)
            assert msg is not None, f"timed out after {len(received)} of {len(lines)}"
            assert msg.error() is None
            received.append((msg.key() or b"", msg.value() or b""))
    finally:
        consumer.close()

    assert sorted(v for _, v in received) == sorted(lines)
    sent_by_user: dict[str, list[bytes]] = {}
    for line in lines:
        event = parse_event(line)
        if isinstance(event, Event):
            sent_by_user.setdefault(event.user_id, []).append(line)
    got_by_user: dict[str, list[bytes]] = {}
    for key, value in received:
        if key:
            got_by_user.setdefault(key.decode(), []).append(value)
    assert got_by_user == sent_by_user  # same events, same order, per user
