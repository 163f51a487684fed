"""The scorer's Redis state store on the real Redis: applied offsets saved atomically with the
states, a store gone back in time refused, key TTLs, OOM refusing the whole save, old layouts removed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from bench.harness import delete_prefix
from core.errors import StoreRefusedError
from core.redis import user_key
from core.settings import Settings
from features.feast_repo import key_ttl_seconds, repo_config_dict
from features.state_store import RedisStateStore, StateRolledBackError, remove_old_layouts
from stream.risk_store import RedisRiskStore, RiskRow

TTL = 3600


@pytest.fixture
def client(settings: Settings, unique: str) -> Iterator[redis.Redis]:
    prefix = f"test:st{unique}:"
    client = redis.Redis.from_url(settings.redis_address)
    yield client
    client.config_set("maxmemory", 0)
    delete_prefix(settings, prefix)
    client.close()


def test_states_and_applied_offsets_are_saved_together_and_checked(client: redis.Redis, unique: str) -> None:
    store = RedisStateStore(client, f"test:st{unique}:", "rA", TTL)
    store.save({"u1": b"one", "u2": b"two"}, {"events:0": 10}, {})
    assert store.applied(["events:0", "events:1"]) == {"events:0": 10, "events:1": -1}
    assert 0 < client.pttl(store.key("u1")) <= TTL * 1000
    assert client.ttl(store.applied_key) == -1  # the offsets never expire

    # Redis holding less than this process saved: refused, and nothing of the save is written.
    with pytest.raises(StateRolledBackError) as raised:
        store.save({"u1": b"newer"}, {"events:0": 20}, {"events:0": 15})
    assert raised.value.behind == {"events:0": 10}
    assert client.get(user_key(f"test:st{unique}:state:rA:", "u1")) == b"one"
    assert store.applied(["events:0"]) == {"events:0": 10}


def test_a_full_redis_refuses_the_whole_save(client: redis.Redis, unique: str) -> None:
    store = RedisStateStore(client, f"test:st{unique}:", "rA", TTL)
    risks = RedisRiskStore(client, f"test:st{unique}:", TTL)
    store.save({"u1": b"one"}, {"events:0": 10}, {})
    client.config_set("maxmemory", 1)  # the test Redis runs with noeviction, as production does
    try:
        with pytest.raises(StoreRefusedError) as refused:
            store.save({"u1": b"newer", "u2": b"two"}, {"events:0": 20}, {"events:0": 10})
        assert refused.value.reason == "OOM"
        with pytest.raises(StoreRefusedError, match="OOM"):
            risks.write([RiskRow("u1", 0.5, "high", "1", 1, 2)])
        assert client.get(user_key(f"test:st{unique}:state:rA:", "u1")) == b"one"  # reads still work
    finally:
        client.config_set("maxmemory", 0)
    assert client.get(user_key(f"test:st{unique}:state:rA:", "u1")) == b"one"
    assert client.get(user_key(f"test:st{unique}:state:rA:", "u2")) is None
    assert store.applied(["events:0"]) == {"events:0": 10}


def test_risk_rows_expire_and_old_layouts_are_removed(client: redis.Redis, unique: str) -> None:
    prefix = f"test:st{unique}:"
    RedisRiskStore(client, prefix, TTL).write([RiskRow("u1", 0.5, "high", "1", 1, 2)])
    assert 0 < client.pttl(user_key(f"{prefix}risk:", "u1")) <= TTL * 1000
    RedisStateStore(client, prefix, "rOld").save({"u1": b"old"}, {"events:0": 3}, {})
    RedisStateStore(client, prefix, "rNew").save({"u1": b"new"}, {"events:0": 5}, {})
    assert remove_old_layouts(client, prefix, "rNew") == 2  # the old state and its offsets
    assert client.get(user_key(f"{prefix}state:rNew:", "u1")) == b"new"
    assert client.exists(f"{prefix}applied:rNew") == 1
    assert client.exists(user_key(f"{prefix}state:rOld:", "u1"), f"{prefix}applied:rOld") == 0
    assert client.get(user_key(f"{prefix}risk:", "u1")) is not None


def test_feature_rows_expire_after_the_lookback_by_default(settings: Settings) -> None:
    assert key_ttl_seconds(settings) == 28 * 86_400 + settings.allowed_lateness_seconds
    assert repo_config_dict(settings)["online_store"]["key_ttl_seconds"] == key_ttl_seconds(settings)
    never = settings.model_copy(update={"redis_key_ttl_seconds": 0})
    assert repo_config_dict(never)["online_store"]["key_ttl_seconds"] is None
