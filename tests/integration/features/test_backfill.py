"""Cold start: `materialize` fills the online store through Feast and rebuilds scorer states."""

from __future__ import annotations

from pathlib import Path

import redis

from core.settings import Settings, load_settings
from features.backfill import materialize
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from features.online import OnlineEngine
from features.state_store import RedisStateStore
from features.store import FeatureRow
from tests.support import random_events, wire_frame


def test_materialize_matches_the_engines(settings: Settings, unique: str, tmp_path: Path) -> None:
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

    def canonical(row: FeatureRow | None) -> str:
        assert row is not None
        return repr((row.user_id, row.last_event_ms, sorted(row.values.items())))  # repr: NaN equals NaN

    assert [canonical(r) for r in read] == [canonical(engine.row(u)) for u in users]

    saved = RedisStateStore(redis.Redis.from_url(local.redis_address), local.redis_prefix, engine.state_layout).load(
        users
    )
    assert set(saved) == set(users)
