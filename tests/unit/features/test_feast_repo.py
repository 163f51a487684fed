"""The Feast repo generated from the spec, and its config from settings (no services)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.redis import TIMEOUTS, Purpose
from core.settings import Settings, load_settings
from features.feast_repo import (
    FEATURE_VIEW_NAME,
    ONLINE_STORE_TYPE,
    PUSH_SOURCE_NAME,
    batch_source_path,
    redis_connection_string,
    repo_config,
    repo_config_dict,
    repo_objects,
    write_feature_store_yaml,
)
from features.spec import INT_FEATURES, LAST_EVENT_MS, STORED_FEATURES, spec_version


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(state_dir=tmp_path, redis_port=16379, feast_project="unit_test", **overrides)


def test_view_has_exactly_the_spec_features_with_their_dtypes(tmp_path: Path) -> None:
    from feast.types import Float64, Int64

    _, _, _, view = repo_objects(_settings(tmp_path))
    assert view.name == FEATURE_VIEW_NAME
    assert [f.name for f in view.features] == [*STORED_FEATURES, LAST_EVENT_MS]
    for field in view.features:
        expected = Int64 if field.name in INT_FEATURES or field.name == LAST_EVENT_MS else Float64
        assert field.dtype == expected, field.name
    assert any(f.dtype == Float64 for f in view.features)  # the spec has both kinds
    assert view.online
    assert view.ttl == timedelta(0)
    assert view.tags["spec_version"] == spec_version()


def test_entity_and_sources(tmp_path: Path) -> None:
    from feast import ValueType
    from feast.types import String

    settings = _settings(tmp_path)
    user, batch, push, view = repo_objects(settings)
    assert user.join_key == "user_id"
    assert user.value_type == ValueType.STRING
    assert [c.name for c in view.entity_columns] == ["user_id"]
    assert view.entity_columns[0].dtype == String
    assert batch.path == str(batch_source_path(settings))
    assert batch.path == str(tmp_path.resolve() / "data" / "features" / "user_features.parquet")
    assert batch.timestamp_field == "event_timestamp"
    assert push.name == PUSH_SOURCE_NAME
    assert push.batch_source == batch
    assert view.stream_source == push


def test_config_from_settings(tmp_path: Path) -> None:
    from feast.repo_config import RepoConfig

    settings = _settings(tmp_path)
    config = repo_config_dict(settings)
    assert config["project"] == "unit_test"
    assert config["provider"] == "local"
    assert config["registry"]["path"] == str(tmp_path.resolve() / "feast" / "registry.db")
    assert config["online_store"]["type"] == ONLINE_STORE_TYPE
    assert config["online_store"]["redis_type"] == "redis"
    assert config["online_store"]["connection_string"].startswith("127.0.0.1:16379,db=0,")
    assert "retry=null" in config["online_store"]["connection_string"]
    assert config["offline_store"] == {"type": "file"}
    default_version = RepoConfig.model_fields["entity_key_serialization_version"].default
    assert config["entity_key_serialization_version"] == default_version


def test_cluster_flag(tmp_path: Path) -> None:
    settings = _settings(tmp_path, redis_cluster=True, redis_url="redis://node-a:7000/0")
    online = repo_config_dict(settings)["online_store"]
    assert online["redis_type"] == "redis_cluster"
    # Cluster has no databases, and RedisCluster rejects a `retry` argument.
    assert online["connection_string"].startswith("node-a:7000,")
    assert "db=" not in online["connection_string"]
    assert "retry=" not in online["connection_string"]
    assert repo_config(settings).online_store.redis_type == "redis_cluster"
    assert repo_config(settings).online_store.type == ONLINE_STORE_TYPE


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://10.0.0.5:6380/2", ["10.0.0.5:6380", "db=2"]),
        ("redis://:s3cret@cache:6379/0", ["cache:6379", "db=0", "password=s3cret"]),
        ("rediss://app:p%40ss@cache/1", ["cache:6379", "db=1", "username=app", "password=p@ss", "ssl=true"]),
    ],
)
def test_connection_string_from_url(tmp_path: Path, url: str, expected: list[str]) -> None:
    parts = redis_connection_string(_settings(tmp_path, redis_url=url)).split(",")
    assert parts[: len(expected)] == expected


@pytest.mark.parametrize("url", ["http://cache:6379/0", "redis:///0", "redis://:a,b@cache:6379/0"])
def test_bad_redis_url_names_the_variable(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="CHURN_REDIS_URL"):
        redis_connection_string(_settings(tmp_path, redis_url=url))


def test_bad_project_name_is_a_config_error(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, feast_project="_starts_with_underscore")
    with pytest.raises(ConfigError, match="CHURN_FEAST_PROJECT"):
        repo_config(settings)


def test_yaml_is_what_feast_loads(tmp_path: Path) -> None:
    from feast.repo_config import load_repo_config

    settings = _settings(tmp_path, redis_cluster=True)
    path = write_feature_store_yaml(settings)
    assert path == settings.feast_repo_dir / "feature_store.yaml"
    loaded = load_repo_config(settings.feast_repo_dir, path)
    assert loaded.project == "unit_test"
    assert loaded.online_store.redis_type == "redis_cluster"
    assert loaded.online_store.skip_dedup is True
    assert loaded.online_store.type == ONLINE_STORE_TYPE
    assert loaded.registry.cache_ttl_seconds == 0
    assert loaded.entity_key_serialization_version == repo_config_dict(settings)["entity_key_serialization_version"]


@pytest.mark.parametrize("purpose", ["batch", "request"])
def test_connection_string_carries_the_timeouts_of_its_purpose(tmp_path: Path, purpose: Purpose) -> None:
    """The API's Feast reads fail as fast as its own client's: with the scorer's timeouts, a hung
    Redis held a request 5 s before its 503."""
    parts = redis_connection_string(_settings(tmp_path), purpose).split(",")
    socket_timeout, connect_timeout = TIMEOUTS[purpose]
    assert f"socket_timeout={socket_timeout:g}" in parts
    assert f"socket_connect_timeout={connect_timeout:g}" in parts
    config = repo_config(_settings(tmp_path), purpose).online_store
    assert f"socket_timeout={socket_timeout:g}" in config.connection_string.split(",")
