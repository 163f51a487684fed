"""The local services are the real ones and answer real requests."""

from __future__ import annotations

import json
import urllib.request

import redis
from confluent_kafka import Consumer, Producer

from core.kafka import kafka_config
from core.settings import Settings
from infra import local as infra


def test_status_reports_every_service_ready(settings: Settings) -> None:
    states = {s.name: s for s in infra.status(settings)}
    assert set(states) == {"kafka", "redis", "prometheus"}
    assert all(s.ready and s.running for s in states.values()), states


def test_produce_and_consume_through_the_real_broker(settings: Settings, topic: str, unique: str) -> None:
    producer = Producer(kafka_config(settings, **{"enable.idempotence": True}))
    sent = [(f"user{i % 7}".encode(), json.dumps({"n": i}).encode()) for i in range(200)]
    for key, value in sent:
        producer.produce(topic, value=value, key=key)
    assert producer.flush(30) == 0

    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"test-{unique}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic])
    received: list[tuple[bytes, bytes]] = []
    try:
        while len(received) < len(sent):
            msg = consumer.poll(10)
            assert msg is not None, f"timed out after {len(received)} messages"
            assert msg.error() is None, msg.error()
            received.append((msg.key() or b"", msg.value() or b""))
    finally:
        consumer.close()
    assert sorted(received) == sorted(sent)
    # Same key, same partition: per-key order is kept.
    for key in {k for k, _ in sent}:
        assert [v for k, v in received if k == key] == [v for k, v in sent if k == key]


def test_redis_round_trip(settings: Settings, unique: str) -> None:
    client = redis.Redis.from_url(settings.redis_address)
    client.set(f"test:{unique}", b"x", ex=60)
    assert client.get(f"test:{unique}") == b"x"


def test_prometheus_answers_queries(settings: Settings) -> None:
    url = f"http://127.0.0.1:{settings.prometheus_port}/api/v1/query?query=up"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success"
