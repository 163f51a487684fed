"""FeastFeatureStore on the real Redis, each test in its own Feast project (registry in tmp_path)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from churn.errors import ConfigError, ServiceUnavailableError
from churn.settings import Settings
from features.feast_repo import FEATURE_VIEW_NAME, apply_repo, open_feature_store, repo_objects
from features.feast_store import FeastFeatureStore
from features.spec import INT_FEATURES, LAST_EVENT_MS, STORED_FEATURES
from features.store import FeatureRow

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture
def scratch(settings: Settings, unique: str, tmp_path: Path) -> Settings:
    """The test settings with a fresh Feast project (letters, digits, `_`: valid for Feast)."""
    return settings.model_copy(update={"feast_project": f"test_{unique}", "feast_repo": tmp_path / "feast"})


@pytest.fixture
def feast(scratch: Settings) -> Iterator[Any]:
    """The applied Feast store; its Redis keys and registry are deleted afterwards."""
    store = apply_repo(scratch)
    yield store
    store.teardown()


@pytest.fixture
def store(feast: Any) -> FeastFeatureStore:
    return FeastFeatureStore(feast)


def _row(user_id: str, last_event_ms: int, seed: int = 0) -> FeatureRow:
    values: dict[str, float] = {
        name: (i * 7 + seed) % 97 if name in INT_FEATURES else (i + seed) / 3 for i, name in enumerate(STORED_FEATURES)
    }
    return FeatureRow(user_id, last_event_ms, values)


def _online(feast: Any, user_ids: list[str]) -> dict[str, list[Any]]:
    refs = [f"{FEATURE_VIEW_NAME}:{name}" for name in (*STORED_FEATURES, LAST_EVENT_MS)]
    return feast.get_online_features(features=refs, entity_rows={"user_id": user_ids}).to_dict()


def test_written_rows_read_back_identical(store: FeastFeatureStore, feast: Any) -> None:
    rows = [_row(f"u{i}", T0 + i, seed=i) for i in range(50)]
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
    row = _row("known", T0)
    store.write_rows([row])
    assert store.read_rows(["nobody", "known", "nobody", "known"]) == [None, row, None, row]
    assert store.read_rows([]) == []


def test_a_rewrite_replaces_the_old_row(store: FeastFeatureStore) -> None:
    store.write_rows([_row("u", T0, seed=1)])
    newer = _row("u", T0 + 60_000, seed=2)
    store.write_rows([newer])
    assert store.read_rows(["u"]) == [newer]
    # A late event changes the row but not its latest event time: the rewrite must still land.
    late = _row("u", T0 + 60_000, seed=3)
    store.write_rows([late])
    assert store.read_rows(["u"]) == [late]


def test_a_batch_keeps_the_latest_row_per_user(store: FeastFeatureStore) -> None:
    latest = _row("u", T0 + 2, seed=2)
    store.write_rows([_row("u", T0 + 1, seed=1), latest, _row("u", T0, seed=0)])
    assert store.read_rows(["u"]) == [latest]


def test_fast_path_and_push_store_the_same(store: FeastFeatureStore, feast: Any) -> None:
    rows = [_row(f"u{i}", T0 + i * 1_001, seed=i) for i in range(20)]
    pushed = [replace(row, user_id=f"p{i}") for i, row in enumerate(rows)]
    store.write_rows(rows)
    store.push_rows(pushed)
    fast_online = _online(feast, [row.user_id for row in rows])
    push_online = _online(feast, [row.user_id for row in pushed])
    fast_online.pop("user_id")
    push_online.pop("user_id")
    assert fast_online == push_online
    assert store.read_rows([row.user_id for row in pushed]) == pushed


def test_a_connection_closed_by_redis_is_replaced(store: FeastFeatureStore, scratch: Settings) -> None:
    import redis

    row = _row("u", T0)
    store.write_rows([row])
    admin = redis.Redis(port=scratch.redis_port)
    ours = [c["id"] for c in admin.client_list() if c["name"] == f"churn-{scratch.feast_project}"]
    assert ours
    for client_id in ours:
        admin.client_kill_filter(_id=client_id)
    assert store.read_rows(["u"]) == [row]
    store.write_rows([row])


def test_redis_down_is_service_unavailable_quickly(feast: Any, scratch: Settings) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    down = FeastFeatureStore(open_feature_store(scratch.model_copy(update={"redis_port": closed_port})))
    for call in (lambda: down.write_rows([_row("u", T0)]), lambda: down.read_rows(["u"])):
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

    from churn.cli import app

    monkeypatch.setenv("CHURN_FEAST_PROJECT", scratch.feast_project)
    monkeypatch.setenv("CHURN_FEAST_REPO", str(scratch.feast_repo_dir))
    result = CliRunner().invoke(app, ["feast-apply"])
    assert result.exit_code == 0, result.output
    assert scratch.feast_project in result.output
    assert f"{FEATURE_VIEW_NAME}: {len(STORED_FEATURES) + 1} features" in result.output
    assert (scratch.feast_repo_dir / "feature_store.yaml").exists()
    FeastFeatureStore(open_feature_store(scratch))  # applied from the current spec
