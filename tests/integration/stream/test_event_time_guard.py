"""One far-future event, and one event without a key, on the real broker, Redis and Feast:
dead-lettered, nothing moves, and the archived log leaves them out."""

from __future__ import annotations

from pathlib import Path

import msgspec
from confluent_kafka import Producer

from core.kafka import kafka_config
from core.redis import redis_client
from core.settings import Settings
from events.log import load_events
from serving.risk import build_clock
from stream.archiver import Archiver
from stream.risk_store import RedisRiskStore
from tests.support import Deployment, produce_paced, random_events, read_dlq, register_champion

YEAR_2099_MS = 4_070_908_800_000  # 2099-01-01T00:00:00Z


def test_a_2099_event_is_dead_lettered_and_moves_nothing(
    settings: Settings, topic: str, unique: str, tmp_path: Path
) -> None:
    deployment = Deployment(settings, register_champion(tmp_path, settings), tmp_path, f"skew{unique}", topic)
    try:
        events = random_events(3, users=8, days=5, per_user=40)
        users = sorted({e.user_id for e in events})
        produce_paced(deployment.settings, events, rate=50_000)
        first = deployment.run_uninterrupted()
        assert first.events_total.labels("ok")._value.get() == len(events)
        client = redis_client(deployment.settings)
        risks = RedisRiskStore(client, deployment.settings.redis_prefix)
        before, watermark = deployment.final_state(users), risks.watermark()
        assert watermark == max(e.ts for e in events)

        # The last event of u1, re-dated to 2099 (a device with a broken clock).
        target = next(e for e in reversed(events) if e.user_id == "u1")
        future = msgspec.structs.replace(target, ts=YEAR_2099_MS, item_in_session=target.item_in_session + 1)
        produce_paced(deployment.settings, [future], rate=1000)
        # The next event of u2, published without a key: it may land on any of the partitions.
        unkeyed = next(e for e in reversed(events) if e.user_id == "u2")
        unkeyed = msgspec.structs.replace(unkeyed, item_in_session=unkeyed.item_in_session + 1)
        producer = Producer(kafka_config(deployment.settings))
        producer.produce(topic, value=unkeyed.to_json())
        assert producer.flush(30) == 0
        second = deployment.run_uninterrupted()

        assert second.events_total.labels("invalid")._value.get() == 2
        assert second.events_total.labels("ok")._value.get() == 0
        dead = dict(read_dlq(deployment.settings, topic, expected=2))
        assert sorted(dead) == sorted([future.to_json(), unkeyed.to_json()])
        reason = dead[future.to_json()]["reason"].decode()
        assert "ahead of its Kafka append time" in reason
        assert "CHURN_MAX_FUTURE_SKEW_SECONDS" in reason
        assert "message has no key" in dead[unkeyed.to_json()]["reason"].decode()
        # Nothing else moved: u1's state, every user's row, state and risk, the watermark and
        # so the API's event-mode clock (every user's `as_of`).
        assert deployment.final_state(users) == before
        assert risks.watermark() == watermark
        assert build_clock("event", risks)() == watermark
        client.close()
        # The archiver, reading the same topic in its own group, leaves it out of the log that
        # training and `churn materialize` read: the log holds what the scorer accepted.
        own = deployment.settings.model_copy(update={"archiver_group": f"skew-archive{unique}"})
        archive = Archiver(own, tmp_path / "archive", lag_every_s=3600)
        archive.run(max_idle_s=2)
        archived = load_events(tmp_path / "archive").collect()
        assert archived.height == len(events)
        assert archived["ts"].max() == watermark
        assert archive.skipped == 2
    finally:
        deployment.cleanup()
