"""FeastFeatureStore on the real Redis, each test in its own Feast project (registry in tmp_path)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.harness import free_port
from churn.cli import app
from core.errors import ConfigError, ServiceUnavailableError, StoreRefusedError
from core.settings import Settings
from features.feast_repo import FEATURE_VIEW_NAME, open_feature_store, repo_objects
from features.feast_store import FeastFeatureStore
from features.redis_store import ChurnRedisOnlineStore
from features.spec import INT_FEATURES, LAST_EVENT_MS, STORED_FEATURES
from features.store import FeatureRow
from tests.support import applied_feast, feast_scratch, sample_feature_row

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture
def scratch(settings: Settings, unique: str, tmp_path: Path) -> Settings:
    """The test settings with a fresh Feast project."""
    return feast_scratch(settings, unique, tmp_path)


@pytest.fixture
def feast(scratch: Settings) -> Iterator[Any]:
    """The applied Feast store; its Redis keys and registry are deleted afterwards."""
    with applied_feast(scratch) as store:
        yield store


@pytest.fixture
def store(feast: Any) -> FeastFeatureStore:
    return FeastFeatureStore(feast)


def _online(feast: Any, user_ids: list[str]) -> dict[str, list[Any]]:
    refs = [f"{FEATURE_VIEW_NAME}:{name}" for name in (*STORED_FEATURES, LAST_EVENT_MS)]
    return feast.get_online_features(features=refs, entity_rows={"user_id": user_ids}).to_dict()


def test_written_rows_read_back_identical(store: FeastFeatureStore, feast: Any) -> None:
    rows = [sample_feature_row(f"u{i}", T0 + i, seed=i) for i in range(50)]
    store.write_rows(rows)
    assert store.read_rows([row.user_id for row in rows]) == rows
    got = store.read_rows(["u3"])[0]
    assert got is not None
    for name in STORED_FEATURES:
        assert type(got.values[name]) is (int if name in INT_FEATURES else float), name
    # Straight from Feast's documented API, too.
    online = _online(feast, ["u3"])
    assert online[LAST_EVENT_MS] == [T0 + 3]
    assert all(online[name] == [rows[3].values[name]] for name in STORED_FEATURES)


def test_unknown_users_read_as_none_in_order(store: FeastFeatureStore) -> None:
    row = sample_feature_row("known", T0)
    store.write_rows([row])
    assert store.read_rows(["nobody", "known", "nobody", "known"]) == [None, row, None, row]
    assert store.read_rows([]) == []


def test_a_rewrite_replaces_the_old_row(store: FeastFeatureStore) -> None:
    store.write_rows([sample_feature_row("u", T0, seed=1)])
    newer = sample_feature_row("u", T0 + 60_000, seed=2)
    store.write_rows([newer])
    assert store.read_rows(["u"]) == [newer]
    # A late event changes the row but not its latest event time: the rewrite must still land.
    late = sample_feature_row("u", T0 + 60_000, seed=3)
    store.write_rows([late])
    assert store.read_rows(["u"]) == [late]


def test_a_batch_keeps_the_latest_row_per_user(store: FeastFeatureStore) -> None:
    latest = sample_feature_row("u", T0 + 2, seed=2)
    store.write_rows([sample_feature_row("u", T0 + 1, seed=1), latest, sample_feature_row("u", T0, seed=0)])
    assert store.read_rows(["u"]) == [latest]


def test_fast_path_and_push_store_the_same(store: FeastFeatureStore, feast: Any) -> None:
    rows = [sample_feature_row(f"u{i}", T0 + i * 1_001, seed=i) for i in range(20)]
    pushed = [replace(row, user_id=f"p{i}") for i, row in enumerate(rows)]
    store.write_rows(rows)
    store.push_rows(pushed)
    fast_online = _online(feast, [row.user_id for row in rows])
    push_online = _online(feast, [row.user_id for row in pushed])
    fast_online.pop("user_id")
    push_online.pop("user_id")
    assert fast_online == push_online
    assert store.read_rows([row.user_id for row in pushed]) == pushed


def test_read_rows_are_what_get_online_features_answers(store: FeastFeatureStore, feast: Any) -> None:
    # `read_rows` decodes the stored bytes itself; Feast's documented read must see the same rows,
    # whichever writer stored them (ours, or Feast's push), NaN and unknown users included.
    rows = [sample_feature_row(f"u{i}", T0 + i * 1_001, seed=i) for i in range(10)]
    rows[3].values["days_since_registration"] = math.nan
    pushed = [replace(row, user_id=f"p{i}") for i, row in enumerate(rows)]
    store.write_rows(rows)
    store.push_rows(pushed)
    ids = ["nobody", *(row.user_id for row in rows), *(row.user_id for row in pushed)]
    online = _online(feast, ids)
    got = store.read_rows(ids)
    assert got[0] is None
    assert online[LAST_EVENT_MS][0] is None
    for i, row in enumerate(got[1:], start=1):
        assert row is not None
        assert row.last_event_ms == online[LAST_EVENT_MS][i]
        for name in STORED_FEATURES:
            expected, value = online[name][i], row.values[name]
            if expected is None or expected != expected:  # null (Feast's NaN) or NaN
                assert math.isnan(value), name
            else:
                assert (value, type(value)) == (expected, type(expected)), name
    assert math.isnan(got[4].values["days_since_registration"])  # type: ignore[union-attr]
    assert math.isnan(got[14].values["days_since_registration"])  # type: ignore[union-attr]


def test_a_connection_closed_by_redis_is_replaced(store: FeastFeatureStore, scratch: Settings) -> None:
    import redis

    row = sample_feature_row("u", T0)
    store.write_rows([row])
    admin = redis.Redis(port=scratch.redis_port)
    ours = [c["id"] for c in admin.client_list() if c["name"] == f"churn-{scratch.feast_project}"]
    assert ours
    for client_id in ours:
        admin.client_kill_filter(_id=client_id)
    assert store.read_rows(["u"]) == [row]
    store.write_rows([row])


def test_redis_down_is_service_unavailable_quickly(feast: Any, scratch: Settings) -> None:
    closed_port = free_port()
    down = FeastFeatureStore(open_feature_store(scratch.model_copy(update={"redis_port": closed_port})))
    for call in (lambda: down.write_rows([sample_feature_row("u", T0)]), lambda: down.read_rows(["u"])):
        began = time.perf_counter()
        with pytest.raises(ServiceUnavailableError, match=f"127.0.0.1:{closed_port}"):
            call()
        assert time.perf_counter() - began < 2  # no multi-second retry backoff


def test_never_applied_or_stale_registry_is_a_config_error(feast: Any, scratch: Settings, tmp_path: Path) -> None:
    never = scratch.model_copy(update={"feast_repo": tmp_path / "elsewhere"})
    with pytest.raises(ConfigError, match="churn feast-apply"):
        FeastFeatureStore(open_feature_store(never))
    *_, view = repo_objects(scratch)
    view.tags["spec_version"] = "older"
    feast.apply([view])
    with pytest.raises(ConfigError, match="churn feast-apply"):
        FeastFeatureStore(open_feature_store(scratch))


def test_cli_feast_apply(scratch: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    monkeypatch.setenv("CHURN_FEAST_PROJECT", scratch.feast_project)
    monkeypatch.setenv("CHURN_FEAST_REPO", str(scratch.feast_repo_dir))
    result = CliRunner().invoke(app, ["feast-apply"])
    assert result.exit_code == 0, result.output
    assert scratch.feast_project in result.output
    assert f"{FEATURE_VIEW_NAME}: {len(STORED_FEATURES) + 1} features" in result.output
    assert (scratch.feast_repo_dir / "feature_store.yaml").exists()
    FeastFeatureStore(open_feature_store(scratch))  # applied from the current spec


def test_our_online_store_writes_the_parents_exact_bytes(
    store: FeastFeatureStore, feast: Any, scratch: Settings
) -> None:
    """The fast write (serialized values) and Feast's own RedisOnlineStore leave identical hashes."""
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore

    assert isinstance(feast.provider.online_store, ChurnRedisOnlineStore)
    admin = redis.Redis(port=scratch.redis_port)
    rows = [sample_feature_row(f"u{i}", T0 + i * 1_001, seed=i) for i in range(30)]
    rows.append(FeatureRow("neg", -1_234, {name: -3 if name in INT_FEATURES else -0.0 for name in STORED_FEATURES}))
    store.write_rows(rows)
    ours = [(key, admin.hgetall(key)) for key in sorted(admin.keys(f"*{scratch.feast_project}".encode()))]
    assert len(ours) == len(rows)
    admin.delete(*(key for key, _ in ours))
    # The same rows as ValueProtos through Feast's own store class.
    protos: list[Any] = [store._to_protos(row) for row in rows]
    RedisOnlineStore().online_write_batch(feast.config, store._view, protos, None)
    parents = [(key, admin.hgetall(key)) for key in sorted(admin.keys(f"*{scratch.feast_project}".encode()))]
    assert ours == parents
    # ValueProtos through our store give the same bytes too.
    admin.delete(*(key for key, _ in parents))
    feast.provider.online_write_batch(feast.config, store._view, protos, None)
    assert [(key, admin.hgetall(key)) for key in sorted(admin.keys(f"*{scratch.feast_project}".encode()))] == parents
    assert store.read_rows([row.user_id for row in rows]) == rows


def test_dedup_and_ttl_options_keep_the_parents_behaviour(
    feast: Any, store: FeastFeatureStore, scratch: Settings
) -> None:
    import redis

    online = feast.config.online_store
    dedup = FeastFeatureStore(open_feature_store(scratch))
    dedup._config.online_store.skip_dedup = False
    dedup._config.online_store.key_ttl_seconds = 600
    assert online.skip_dedup is True  # a separate config object
    newer, older = sample_feature_row("u", T0 + 10, seed=1), sample_feature_row("u", T0, seed=2)
    dedup.write_rows([newer])
    dedup.write_rows([older])  # Feast's dedup drops a row older than the stored one
    assert dedup.read_rows(["u"]) == [newer]
    admin = redis.Redis(port=scratch.redis_port)
    (key,) = admin.keys(f"*{scratch.feast_project}".encode())
    assert 0 < admin.ttl(key) <= 600
    store.write_rows([older])  # skip_dedup (our config): the write lands
    assert store.read_rows(["u"]) == [older]


def test_a_key_ttl_is_set_by_the_fast_write_as_by_the_parent(
    feast: Any, store: FeastFeatureStore, scratch: Settings
) -> None:
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore

    expiring = FeastFeatureStore(open_feature_store(scratch))
    expiring._config.online_store.key_ttl_seconds = 600
    row = sample_feature_row("u", T0)
    expiring.write_rows([row])
    admin = redis.Redis(port=scratch.redis_port)
    (key,) = admin.keys(f"*{scratch.feast_project}".encode())
    assert 0 < admin.ttl(key) <= 600
    ours = admin.hgetall(key)
    admin.delete(key)
    protos: list[Any] = [store._to_protos(row)]
    RedisOnlineStore().online_write_batch(expiring._config, store._view, protos, None)
    assert admin.hgetall(key) == ours
    assert 0 < admin.ttl(key) <= 600
    assert expiring.read_rows(["u"]) == [row]


def test_int_features_given_as_floats_or_big_numbers(store: FeastFeatureStore) -> None:
    row = sample_feature_row("u", T0)
    ints = [name for name in STORED_FEATURES if name in INT_FEATURES]
    given = {**row.values, ints[0]: 5.0, ints[1]: 10**12, ints[2]: 7.9}
    store.write_rows([FeatureRow("u", T0, given)])
    expected = {**row.values, ints[0]: 5, ints[1]: 10**12, ints[2]: 7}  # int(), as before
    assert store.read_rows(["u"]) == [FeatureRow("u", T0, expected)]


def test_a_refused_command_raises_and_the_connection_stays_usable(
    store: FeastFeatureStore, feast: Any, scratch: Settings
) -> None:
    import redis
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = _redis_key(scratch.feast_project, EntityKey(join_keys=["user_id"], entity_values=[Value(string_val="bad")]))
    admin = redis.Redis(port=scratch.redis_port)
    admin.set(key, b"not a hash")
    good = [sample_feature_row("a", T0), sample_feature_row("b", T0 + 1)]
    # Classified once (core.redis): a refusal that lasts, with its code, a 503 in the API.
    with pytest.raises(StoreRefusedError, match="WRONGTYPE") as refused:
        store.write_rows([good[0], sample_feature_row("bad", T0), good[1]])
    assert refused.value.reason == "WRONGTYPE"
    assert store.read_rows(["a", "b"]) == good  # the other rows of the batch landed
    admin.delete(key)
    store.write_rows([sample_feature_row("bad", T0)])
    assert store.read_rows(["bad"]) == [sample_feature_row("bad", T0)]
