"""The Feast repo, generated from the feature spec: entity, sources, feature view and config.

Nothing here lists a feature by hand: the view's schema comes from `features.spec`. Feast is
imported inside the functions because `import feast` takes seconds; importing this module
reads no settings and opens no connection.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from core.errors import ConfigError
from core.redis import TIMEOUTS, Purpose, redis_errors
from core.settings import Settings
from features.spec import INT_FEATURES, LAST_EVENT_MS, STORED_FEATURES, WINDOWS, spec_version

if TYPE_CHECKING:
    from feast import Entity, FeatureStore, FeatureView, FileSource, PushSource, RepoConfig


ENTITY_NAME = "user"
JOIN_KEY = "user_id"
FEATURE_VIEW_NAME = "user_features"
PUSH_SOURCE_NAME = "user_features_push"
TIMESTAMP_FIELD = "event_timestamp"
# The view carries the spec's hash, so a process can tell that the registry is stale.
SPEC_VERSION_TAG = "spec_version"
# Feast's current (and only non-deprecated) entity key encoding.
ENTITY_KEY_SERIALIZATION_VERSION = 3
# Feast's Redis online store with a leaner write path (`features.redis_store`); Feast imports
# `ChurnRedisOnlineStoreConfig` / `ChurnRedisOnlineStore` from this name.
ONLINE_STORE_TYPE = "features.redis_store.ChurnRedisOnlineStore"


def view_feature_names() -> tuple[str, ...]:
    """Returns the feature names of the `user_features` view, in order: the spec's stored
    features, then `last_event_ms`."""
    return (*STORED_FEATURES, LAST_EVENT_MS)


def is_int_feature(name: str) -> bool:
    """Returns True if the view stores `name` as Int64 (else Float64)."""
    return name in INT_FEATURES or name == LAST_EVENT_MS


def batch_source_path(settings: Settings) -> Path:
    """Returns the Parquet file the offline backfill writes and the FileSource reads."""
    return settings.data_dir / "features" / "user_features.parquet"


def redis_connection_string(settings: Settings, purpose: Purpose = "batch") -> str:
    """Returns `settings.redis_address` in Feast's `host:port,key=value,...` form, with the
    socket timeouts of `purpose` (`core.redis.TIMEOUTS`: the API's Feast reads fail as fast as
    its own, a hung Redis answering a request with a 503 after 2 s, not the scorer's 5 s).

    Redis Cluster has no databases, so `db` is left out when `settings.redis_cluster` is set.

    Raises:
        ConfigError: the URL is not a `redis://` or `rediss://` URL with a host, or carries a
            `,` or `=` in a credential (Feast's connection string cannot express those).
    """
    url = urlsplit(settings.redis_address)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        msg = f"CHURN_REDIS_URL: expected redis://[user:password@]host:port/db, got {settings.redis_address!r}"
        raise ConfigError(msg)
    parts = [f"{url.hostname}:{url.port or 6379}"]
    db = url.path.strip("/")
    if db and not settings.redis_cluster:
        parts.append(f"db={int(db)}")
    for key, value in (("username", url.username), ("password", url.password)):
        if value:
            value = unquote(value)
            if "," in value or "=" in value:
                msg = f"CHURN_REDIS_URL: the {key} must not contain ',' or '=' (Feast splits its connection string)"
                raise ConfigError(msg)
            parts.append(f"{key}={value}")
    if url.scheme == "rediss":
        parts.append("ssl=true")
    socket_timeout, connect_timeout = TIMEOUTS[purpose]
    parts.append(f"socket_timeout={socket_timeout:g}")
    parts.append(f"socket_connect_timeout={connect_timeout:g}")
    # Names the connections in CLIENT LIST, so an operator can tell who is connected.
    parts.append(f"client_name=churn-{settings.feast_project}")
    if not settings.redis_cluster:
        # redis-py's default retries with backoff would hold a request for up to ~10 s
        # while Redis is down; fail at once with a 503 instead. A pooled connection that
        # Redis closed is still replaced on checkout. RedisCluster rejects a `retry`
        # argument and keeps its own policy.
        parts.append("retry=null")
    return ",".join(parts)


def key_ttl_seconds(settings: Settings) -> int:
    """Returns how long user keys (states, feature rows, risk rows) live without a write:
    `redis_key_ttl_seconds`, or by default the longest window plus the allowed lateness (a user
    idle that long has every window empty); 0 means never expire."""
    if settings.redis_key_ttl_seconds is not None:
        return settings.redis_key_ttl_seconds
    return max(w.size_ms for w in WINDOWS) // 1000 + settings.allowed_lateness_seconds


def repo_config_dict(settings: Settings, purpose: Purpose = "batch") -> dict[str, Any]:
    """Returns the `feature_store.yaml` content for these settings, as a dict (Redis timeouts
    of `purpose`)."""
    return {
        "project": settings.feast_project,
        "provider": "local",
        "registry": {
            "registry_type": "file",
            "path": str(settings.feast_repo_dir / "registry.db"),
            # 0: cache forever. The view only changes with the spec, i.e. with a code change
            # and a restart, so the hot path never re-reads the registry on a TTL expiry.
            "cache_ttl_seconds": 0,
        },
        "online_store": {
            # Feast's `redis` store (same keys, values, reads, options), with a faster
            # `online_write_batch`; the `feast` CLI needs this project importable to load it.
            "type": ONLINE_STORE_TYPE,
            "redis_type": "redis_cluster" if settings.redis_cluster else "redis",
            "connection_string": redis_connection_string(settings, purpose),
            # One pipeline round trip per write instead of read-timestamps-then-write. It is
            # also required for correctness: a late event (ts < the user's latest event) changes
            # the row but not its timestamp, and Feast's dedup would drop that update. Each
            # user has one writer (its Kafka partition's scorer), so no race is opened.
            "skip_dedup": True,
            # Rows of users idle for the lookback expire (EXPIRE with every write); None: never.
            "key_ttl_seconds": key_ttl_seconds(settings) or None,
        },
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": ENTITY_KEY_SERIALIZATION_VERSION,
    }


def repo_config(settings: Settings, purpose: Purpose = "batch") -> RepoConfig:
    """Returns the Feast RepoConfig for these settings and Redis timeouts of `purpose` (no file
    is read or written).

    Raises:
        ConfigError: the settings give an invalid Feast config (e.g. a bad project name).
    """
    from feast import RepoConfig

    try:
        return RepoConfig(repo_path=settings.feast_repo_dir, **repo_config_dict(settings, purpose))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        msg = f"invalid Feast config from settings (CHURN_FEAST_PROJECT, CHURN_REDIS_URL?): {exc}"
        raise ConfigError(msg) from exc


def write_feature_store_yaml(settings: Settings) -> Path:
    """Writes `feature_store.yaml` into `settings.feast_repo_dir` (for the `feast` CLI and UI);
    returns its path."""
    import yaml

    settings.feast_repo_dir.mkdir(parents=True, exist_ok=True)
    path = settings.feast_repo_dir / "feature_store.yaml"
    path.write_text(yaml.safe_dump(repo_config_dict(settings), sort_keys=False))
    return path


def repo_objects(settings: Settings) -> tuple[Entity, FileSource, PushSource, FeatureView]:
    """Returns the entity, the Parquet batch source, the push source and the feature view,
    all generated from `features.spec`."""
    from datetime import timedelta

    from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
    from feast.types import Float64, Int64, String

    user = Entity(
        name=ENTITY_NAME,
        join_keys=[JOIN_KEY],
        value_type=ValueType.STRING,
        description="a listener (eventsim userId)",
    )
    batch = FileSource(
        name="user_features_parquet",
        path=str(batch_source_path(settings)),
        timestamp_field=TIMESTAMP_FIELD,
        description="offline backfill of the feature rows, one per (user, event time)",
    )
    push = PushSource(name=PUSH_SOURCE_NAME, batch_source=batch)
    schema = [Field(name=JOIN_KEY, dtype=String)] + [
        Field(name=name, dtype=Int64 if is_int_feature(name) else Float64) for name in view_feature_names()
    ]
    view = FeatureView(
        name=FEATURE_VIEW_NAME,
        entities=[user],
        # 0: rows never expire. A row is the user as of their latest event; how old that is
        # is the request-time feature `seconds_since_last_event`, not a reason to hide it.
        ttl=timedelta(0),
        schema=schema,
        source=push,
        online=True,
        tags={SPEC_VERSION_TAG: spec_version()},
    )
    return user, batch, push, view


def open_feature_store(settings: Settings, purpose: Purpose = "batch") -> FeatureStore:
    """Returns a Feast FeatureStore for processes that only read and write rows (no apply),
    whose Redis clients have the timeouts of `purpose` (the API: "request").

    Nothing connects yet: Feast opens Redis and loads the registry on first use.

    Raises:
        ConfigError: the settings give an invalid Feast config.
    """
    from feast import FeatureStore

    return FeatureStore(repo_path=str(settings.feast_repo_dir), config=repo_config(settings, purpose))


def apply_repo(settings: Settings) -> FeatureStore:
    """Writes `feature_store.yaml`, registers the spec's objects (idempotent) and returns the store.

    Raises:
        ConfigError: the settings give an invalid Feast config.
        ServiceUnavailableError: Redis cannot be reached.
    """
    write_feature_store_yaml(settings)
    store = open_feature_store(settings)
    with translate_redis_errors("applying the Feast repo", redis_connection_string(settings).split(",", 1)[0]):
        store.apply(list(repo_objects(settings)))
    return store


def translate_redis_errors(action: str, address: str) -> AbstractContextManager[None]:
    """Returns a context that turns Redis errors into ServiceUnavailableError / StoreRefusedError
    (HTTP 503, classified by `core.redis.redis_errors`) naming `action`."""
    return redis_errors(action, f"Redis (Feast online store at {address})")
