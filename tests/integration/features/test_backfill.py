"""Cold start: `materialize` fills the online store through Feast and rebuilds scorer states."""

from __future__ import annotations

from pathlib import Path

import msgspec
import polars as pl
import pytest
import redis
from typer.testing import CliRunner

from churn.cli import app
from core.settings import Settings, load_settings
from events.schema import CHURN_PAGE
from features import backfill
from features.backfill import BackfilledUsers, materialize
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from features.online import LATE, STATE_ENCODER, OnlineEngine
from features.state_store import RedisStateStore
from features.store import FeatureRow
from stream.risk_store import RedisRiskStore
from stream.snapshot import RedisActivity
from tests.support import random_events, wire_frame


def _canonical(row: FeatureRow | None) -> str:
    assert row is not None
    return repr((row.user_id, row.last_event_ms, sorted(row.values.items())))  # repr: NaN equals NaN


def test_materialize_matches_the_engines(
    settings: Settings, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "SAVE_CHUNK_USERS", 7)  # 30 users: the states go in five scripts
    events = random_events(5, users=30, days=20, per_user=150)
    log = tmp_path / "log.parquet"
    wire_frame(events).write_parquet(log)
    local = load_settings(
        state_dir=tmp_path, feast_project=f"m{unique}", redis_prefix=f"test:m{unique}:",
        kafka_port=settings.kafka_port, redis_port=settings.redis_port,
    )  # fmt: skip
    apply_repo(local)
    summary = materialize(local, log)
    assert summary["users"] == 30

    engine = OnlineEngine()
    engine.apply_all(events)
    users = sorted(engine.states)
    read = FeastFeatureStore(apply_repo(local)).read_rows(users)

    assert [_canonical(r) for r in read] == [_canonical(engine.row(u)) for u in users]

    saved = RedisStateStore(redis.Redis.from_url(local.redis_address), local.redis_prefix, engine.state_layout).load(
        users
    )
    assert set(saved) == set(users)
    assert all(STATE_ENCODER.encode(saved[u]) == STATE_ENCODER.encode(engine.states[u]) for u in users)


def test_materialize_with_late_events_equals_the_engine_fed_in_offset_order(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    events = random_events(8, users=12, days=10, per_user=120)
    last_of_u3 = max(e.ts for e in events if e.user_id == "u3")
    cancel = msgspec.structs.replace(
        next(e for e in events if e.user_id == "u3"), ts=last_of_u3 + 60_000, page=CHURN_PAGE, length=None
    )
    events.append(cancel)
    # Arrival (offset) order: every 15th event arrives two hours late (beyond the default
    # lateness of one hour, so the stream drops it), every 7th up to 50 minutes late (kept).
    delays = [7_200_000 if i % 15 == 0 else 3_000_000 if i % 7 == 0 else 0 for i in range(len(events))]
    arrival = [e for _, _, e in sorted(((e.ts + d, i, e) for i, (e, d) in enumerate(zip(events, delays, strict=True))))]
    offsets: dict[int, int] = {}
    positions = []
    for e in arrival:
        partition = int(e.user_id[1:]) % 3
        offsets[partition] = offsets.get(partition, -1) + 1
        positions.append((partition, offsets[partition]))
    log = tmp_path / "archive"
    log.mkdir()
    frame = wire_frame(arrival).with_columns(
        pl.Series("kafkaPartition", [p for p, _ in positions]), pl.Series("kafkaOffset", [o for _, o in positions])
    )
    frame.write_parquet(log / "part-0.parquet")
    local = load_settings(
        state_dir=tmp_path, feast_project=f"l{unique}", redis_prefix=f"test:l{unique}:",
        kafka_port=settings.kafka_port, redis_port=settings.redis_port,
    )  # fmt: skip
    apply_repo(local)
    recorded: list[BackfilledUsers] = []
    materialize(local, log, record_users=recorded.append)

    engine = OnlineEngine()
    outcomes = [engine.apply(e, p, o) for e, (p, o) in zip(arrival, positions, strict=True)]
    assert outcomes.count(LATE) > 0  # the late events really are dropped by the stream
    users = sorted(engine.states)
    read = FeastFeatureStore(apply_repo(local)).read_rows(users)
    assert [_canonical(r) for r in read] == [_canonical(engine.row(u)) for u in users]
    saved = RedisStateStore(redis.Redis.from_url(local.redis_address), local.redis_prefix, engine.state_layout).load(
        users
    )
    assert {u: STATE_ENCODER.encode(s) for u, s in saved.items()} == {
        u: STATE_ENCODER.encode(s) for u, s in engine.states.items()
    }
    [users_saved] = recorded
    assert users_saved.cancelled == [("u3", cancel.ts, cancel.ts)]
    assert users_saved.latest == {u: s.last_ts for u, s in engine.states.items() if u != "u3"}
    assert saved["u3"].cancelled_ms == cancel.ts


def test_churn_materialize_fills_the_snapshot_population_and_the_stream_clock(
    settings: Settings, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a cold start the scorer replays only what Kafka still holds: users whose last event
    is older than the topic's retention were missing from every daily snapshot until they came
    back, because the snapshot's population (`<prefix>active`) was left empty."""
    events = random_events(6, users=10, days=5, per_user=40)
    cancel = msgspec.structs.replace(
        max((e for e in events if e.user_id == "u4"), key=lambda e: e.ts), page=CHURN_PAGE, length=None
    )
    cancel = msgspec.structs.replace(cancel, ts=cancel.ts + 60_000)
    events.append(cancel)
    log = tmp_path / "log.parquet"
    wire_frame(events).write_parquet(log)
    env = {
        "CHURN_STATE_DIR": str(tmp_path), "CHURN_FEAST_PROJECT": f"p{unique}", "CHURN_REDIS_PREFIX": f"test:p{unique}:",
        "CHURN_REDIS_PORT": str(settings.redis_port), "CHURN_KAFKA_PORT": str(settings.kafka_port),
    }  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    local = load_settings()
    apply_repo(local)
    result = CliRunner().invoke(app, ["materialize", "--events", str(log)])
    assert result.exit_code == 0, result.output

    engine = OnlineEngine()
    engine.apply_all(events)
    client = redis.Redis.from_url(local.redis_address)
    activity = RedisActivity(client, local.redis_prefix)
    last = max(e.ts for e in events)
    assert activity.active(0, last) == sorted(u for u in engine.states if u != "u4")
    assert activity.churn_times(["u4", "u1"]) == {"u4": cancel.ts}
    assert RedisRiskStore(client, local.redis_prefix).watermark() == last
