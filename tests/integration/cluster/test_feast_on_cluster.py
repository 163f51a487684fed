"""The project's Feast writes on a Redis Cluster (`features.redis_store`): each row goes to the
master of its key's slot, as the bytes Feast's own store writes, and a write that meets a slot
map gone stale (a failover, a resharding) is refused once as a passing outage and lands on the
retry, with the map asked again."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from feast.infra.online_stores.redis import RedisOnlineStore
from redis.cluster import RedisCluster

from core.errors import ServiceUnavailableError
from core.redis import redis_client
from core.settings import Settings
from features.feast_repo import open_feature_store
from features.feast_store import FeastFeatureStore
from features.redis_store import ChurnRedisOnlineStore, HashWriter
from features.spec import LAST_EVENT_MS
from tests.support import applied_feast, feast_scratch, sample_feature_row

pytestmark = pytest.mark.cluster

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture
def scratch(cluster: Settings, unique: str, tmp_path: Path) -> Settings:
    """The clusters' settings with a fresh Feast project."""
    return feast_scratch(cluster, unique, tmp_path)


@pytest.fixture
def feast(scratch: Settings) -> Iterator[Any]:
    """The applied Feast store on the Redis Cluster; its keys and registry go afterwards."""
    with applied_feast(scratch) as store:
        yield store


@pytest.fixture
def admin(scratch: Settings) -> Iterator[RedisCluster]:
    client = redis_client(scratch)
    assert isinstance(client, RedisCluster)
    yield client
    client.close()


def _hashes(admin: RedisCluster, project: str) -> dict[bytes, dict[bytes, bytes]]:
    """Returns every hash of the Feast project, from every master."""
    keys = admin.keys(f"*{project}", target_nodes=RedisCluster.PRIMARIES)
    return {key: admin.hgetall(key) for key in keys}


def _writer(store: FeastFeatureStore, feast: Any) -> HashWriter | None:
    online = feast.provider.online_store
    assert isinstance(online, ChurnRedisOnlineStore)
    return online.hash_writer(feast.config, store._view, "user_id", store._int_names, store._float_names, LAST_EVENT_MS)


def test_rows_go_to_every_master_as_the_bytes_feasts_own_store_writes(
    feast: Any, scratch: Settings, admin: RedisCluster
) -> None:
    store = FeastFeatureStore(feast)
    writer = _writer(store, feast)
    assert writer is not None  # the fast writer serves the cluster (it returned None before)
    assert isinstance(writer.client, RedisCluster)
    rows = [sample_feature_row(f"u{i}", T0 + i * 1_001, seed=i) for i in range(300)]
    store.write_rows(rows)
    ours = _hashes(admin, scratch.feast_project)
    assert len(ours) == len(rows)
    masters = {admin.get_node_from_key(key).name for key in ours}  # type: ignore[union-attr]
    assert len(masters) == len(admin.get_primaries()) == 3
    admin.delete(*ours)  # redis-py splits a multi-slot DEL per slot
    # The same rows as ValueProtos through Feast's own store class (redis-py's cluster pipeline).
    protos: list[Any] = [store._to_protos(row) for row in rows]
    RedisOnlineStore().online_write_batch(feast.config, store._view, protos, None)
    assert _hashes(admin, scratch.feast_project) == ours
    admin.delete(*ours)
    # ValueProtos through our store's `online_write_batch` (per-master streams too).
    feast.provider.online_write_batch(feast.config, store._view, protos, None)
    assert _hashes(admin, scratch.feast_project) == ours
    assert store.read_rows([row.user_id for row in rows]) == rows


def test_a_key_ttl_is_set_on_the_cluster_as_on_one_server(feast: Any, scratch: Settings, admin: RedisCluster) -> None:
    expiring = FeastFeatureStore(open_feature_store(scratch))
    expiring._config.online_store.key_ttl_seconds = 600
    rows = [sample_feature_row(f"t{i}", T0 + i) for i in range(40)]
    expiring.write_rows(rows)
    keys = list(_hashes(admin, scratch.feast_project))
    assert len(keys) == len(rows)
    assert all(0 < admin.ttl(key) <= 600 for key in keys)
    assert expiring.read_rows([row.user_id for row in rows]) == rows


def test_a_stale_slot_map_fails_one_write_as_an_outage_and_the_retry_lands(
    feast: Any, scratch: Settings, admin: RedisCluster
) -> None:
    """What a write meets right after a failover or a resharding: the client's map names a
    master that no longer serves the slot, which answers MOVED. The write is refused as a
    passing outage (the scorer retries the batch with backoff, not ready meanwhile), the map is
    asked again, and the retry lands every row on the right master."""
    store = FeastFeatureStore(feast)
    rows = [sample_feature_row(f"m{i}", T0 + i, seed=i) for i in range(60)]
    store.write_rows(rows[:1])  # the store's cluster client and its slot map exist
    writer = _writer(store, feast)
    assert writer is not None
    client = writer.client
    assert isinstance(client, RedisCluster)
    key = next(iter(_hashes(admin, scratch.feast_project)))
    slot = client.keyslot(key)
    owner = client.get_node_from_key(key)
    assert owner is not None
    other = next(node for node in client.get_primaries() if node.name != owner.name)
    slots: Any = client.nodes_manager.slots_cache  # redis-py's stubs key it by name
    slots[slot] = [other]  # stale: the slot served by another master

    with pytest.raises(ServiceUnavailableError, match="unavailable while writing 60 feature rows"):
        store.write_rows(rows)
    assert client.get_node_from_key(key).name == owner.name  # type: ignore[union-attr]  # asked again
    store.write_rows(rows)
    assert store.read_rows([row.user_id for row in rows]) == rows


def test_the_redis_py_internals_the_per_master_sender_uses_are_there(admin: RedisCluster) -> None:
    """A contract with redis-py (pinned to the tested minor in pyproject.toml): after a failure
    `core.redis_masters` does what redis-py's own commands do, through its nodes manager."""
    nodes: Any = admin.nodes_manager
    assert list(inspect.signature(nodes.move_node_to_end_of_cached_nodes).parameters) == ["node_name"]
    assert "additional_startup_nodes_info" in inspect.signature(nodes.initialize).parameters
    assert isinstance(nodes.slots_cache, dict)
