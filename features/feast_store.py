"""`FeastFeatureStore`: the production FeatureStore, Feast's Redis online store.

Writes skip push's DataFrame -> Arrow -> proto conversion. The configured online store is
`features.redis_store.ChurnRedisOnlineStore`, Feast's Redis store with a leaner write that stores
the same keys and bytes: on one Redis server or a Redis Cluster its `HashWriter` takes the rows as
plain numbers and sends the HSETs it builds (on a cluster, to each key's master); otherwise
(Feast's dedup turned on) the rows go to the provider's `online_write_batch` (the call
`FeatureStore.push` ends in) with their values already serialized. Rows are read back as the
stored bytes (`read_values`, the HMGET Feast's `online_read` sends), decoded here. Another
configured store gets ValueProtos and is read with `get_online_features`, the documented API.
Anything Feast reads (its feature server, `feast` CLI, `materialize`) sees the same rows.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from features.feast_repo import (
    FEATURE_VIEW_NAME,
    JOIN_KEY,
    PUSH_SOURCE_NAME,
    SPEC_VERSION_TAG,
    TIMESTAMP_FIELD,
    is_int_feature,
    translate_redis_errors,
    view_feature_names,
)
from features.spec import LAST_EVENT_MS, STORED_FEATURES, spec_version
from features.store import FeatureRow

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    # One row as `online_write_batch` takes it: key, values, event time, created time. Values are
    # ValueProtos, or their serialized bytes for `ChurnRedisOnlineStore`.
    OnlineRow = tuple[EntityKeyProto, Mapping[str, ValueProto | bytes], datetime, datetime | None]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAN = float("nan")
# Distinct small ints (counts) whose ValueProto is built once and shared.
_INT_CACHE_SIZE = 100_000


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def event_time(last_event_ms: int) -> datetime:
    """Returns the row's Feast event timestamp: its latest event time as an exact UTC datetime."""
    return _EPOCH + timedelta(milliseconds=last_event_ms)


def latest_per_user(rows: Sequence[FeatureRow]) -> list[FeatureRow]:
    """Returns one row per user: the one with the largest `last_event_ms`, the later one on a tie."""
    latest: dict[str, FeatureRow] = {}
    for row in rows:
        seen = latest.get(row.user_id)
        if seen is None or row.last_event_ms >= seen.last_event_ms:
            latest[row.user_id] = row
    return list(latest.values())


def rows_to_frame(rows: Sequence[FeatureRow]) -> pd.DataFrame:
    """Returns the rows as the DataFrame `store.push("user_features_push", df)` expects
    (`user_id`, `event_timestamp`, one typed column per view feature)."""
    import pandas as pd

    columns: dict[str, Any] = {
        JOIN_KEY: [row.user_id for row in rows],
        TIMESTAMP_FIELD: pd.to_datetime([row.last_event_ms for row in rows], unit="ms", utc=True),
        LAST_EVENT_MS: pd.array([row.last_event_ms for row in rows], dtype="int64"),
    }
    for name in STORED_FEATURES:
        values = [row.values[name] for row in rows]
        columns[name] = pd.array(values, dtype="int64") if is_int_feature(name) else pd.array(values, dtype="float64")
    return pd.DataFrame(columns)


def _values_getter(names: Sequence[str]) -> Callable[[Mapping[str, float]], Sequence[float]]:
    """Returns a function giving the values of `names` of a mapping, in order, as a sequence."""
    if len(names) == 1:
        name = names[0]
        return lambda values: (values[name],)
    if not names:
        return lambda values: ()
    return operator.itemgetter(*names)


class FeastFeatureStore:
    """The FeatureStore on Feast's Redis online store (view `user_features`).

    Build it once per process with `FeastFeatureStore(open_feature_store(settings))`. The
    registry is read once here; Feast caches it for good (`cache_ttl_seconds: 0`), so a
    re-apply with a new spec needs a restart, which a spec change implies anyway.
    """

    def __init__(self, store: FeatureStore) -> None:
        """Resolves the view from the registry and checks it matches the spec.

        Raises:
            ConfigError: the repo was never applied, or was applied from another spec version.
        """
        from feast.errors import FeatureViewNotFoundException
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self._store = store
        self._config = store.config
        self._provider = store.provider
        self._address = store.config.online_store.connection_string.split(",", 1)[0]
        try:
            self._view = store.get_feature_view(FEATURE_VIEW_NAME)
        except FeatureViewNotFoundException as exc:
            msg = f"Feast project {store.project!r} has no view {FEATURE_VIEW_NAME!r}: run `churn feast-apply`"
            raise ConfigError(msg) from exc
        names = tuple(field.name for field in self._view.features)
        registered = self._view.tags.get(SPEC_VERSION_TAG)
        if names != view_feature_names() or registered != spec_version():
            msg = (
                f"Feast view {FEATURE_VIEW_NAME!r} was applied from spec {registered}, the code has spec "
                f"{spec_version()}: run `churn feast-apply`"
            )
            raise ConfigError(msg)
        self._feature_refs = [f"{FEATURE_VIEW_NAME}:{name}" for name in names]
        self._int_flags = [(name, is_int_feature(name)) for name in STORED_FEATURES]
        self._int_names = [name for name in STORED_FEATURES if is_int_feature(name)]
        self._float_names = [name for name in STORED_FEATURES if not is_int_feature(name)]
        # A row's int and float values in view order, picked in C (one name: a 1-tuple).
        self._int_getter = _values_getter(self._int_names)
        self._float_getter = _values_getter(self._float_names)
        # The serialized-values path needs our store; another configured store gets ValueProtos.
        from features.redis_store import (  # heavy: subclasses Feast's store, so importing it loads Feast
            ChurnRedisOnlineStore,
            cached_int64,
            decode_value,
            encode_doubles,
            encode_int64,
        )

        self._encode_int64, self._encode_doubles, self._int_bytes = encode_int64, encode_doubles, cached_int64
        self._decode_value = decode_value
        online_store = getattr(self._provider, "online_store", None)
        self._serialized = isinstance(online_store, ChurnRedisOnlineStore)
        self._online_store = online_store if self._serialized else None
        # What `read_rows` asks our store for: the stored features, then the latest event time.
        self._read_names = (*STORED_FEATURES, LAST_EVENT_MS)
        self._value_cls = Value
        self._entity_key_cls = EntityKey
        self._int_cache: dict[int, ValueProto] = {}

    def write_rows(self, rows: Sequence[FeatureRow]) -> None:
        """Upserts the rows (the latest per user if a user repeats) in one Redis pipeline.

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
            KeyError: a row lacks one of `features.spec.STORED_FEATURES` (a bug upstream).
        """
        if not rows:
            return
        latest = latest_per_user(rows)
        writer = None
        if self._online_store is not None:
            writer = self._online_store.hash_writer(
                self._config, self._view, JOIN_KEY, self._int_names, self._float_names, LAST_EVENT_MS
            )
        if writer is not None:  # our store (one server or a cluster): rows go as numbers, encoded once
            ints, floats = self._int_getter, self._float_getter
            with translate_redis_errors(f"writing {len(latest)} feature rows", self._address):
                writer.write((row.user_id, row.last_event_ms, ints(row.values), floats(row.values)) for row in latest)
            return
        to_row = self._to_serialized if self._serialized else self._to_protos
        data: list[OnlineRow] = [to_row(row) for row in latest]
        with translate_redis_errors(f"writing {len(data)} feature rows", self._address):
            # Feast types the values as ValueProtos; our store also takes their bytes.
            self._provider.online_write_batch(self._config, self._view, data, None)  # type: ignore[arg-type]

    def push_rows(self, rows: Sequence[FeatureRow]) -> None:
        """Writes the rows with Feast's documented `store.push` (slower; for comparisons).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        if not rows:
            return
        frame = rows_to_frame(latest_per_user(rows))
        with translate_redis_errors(f"pushing {len(frame)} feature rows", self._address):
            self._store.push(PUSH_SOURCE_NAME, frame)

    def read_rows(self, user_ids: Sequence[str]) -> list[FeatureRow | None]:
        """Returns one row per id in order, `None` for users never written; one HMGET per user
        (in one pipeline for several users).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
            ValueError: a stored value is not a number (the view was written by something else).
        """
        if not user_ids:
            return []
        ids = list(user_ids)
        if self._online_store is not None:
            return self._read_values(ids)
        with translate_redis_errors(f"reading {len(ids)} feature rows", self._address):
            response = self._store.get_online_features(features=self._feature_refs, entity_rows={JOIN_KEY: ids})
        columns = response.to_dict()
        last_event = columns[LAST_EVENT_MS]
        out: list[FeatureRow | None] = []
        for i, user_id in enumerate(ids):
            if last_event[i] is None:  # never written: Feast answers NOT_FOUND with null values
                out.append(None)
                continue
            # A missing float (Feast's materialize stores NaN as null) is NaN for the model.
            values = {
                name: int(columns[name][i]) if is_int else _float(columns[name][i]) for name, is_int in self._int_flags
            }
            out.append(FeatureRow(user_id=user_id, last_event_ms=int(last_event[i]), values=values))
        return out

    def read_rows_and(
        self, user_ids: Sequence[str], command: Sequence[Any]
    ) -> tuple[list[FeatureRow | None], Any] | None:
        """Returns what `read_rows` returns and the reply of one more Redis `command` (on the
        online store's server, e.g. an MGET of rows kept beside the features), sent in the same
        pipeline: one round trip for both. None where the store cannot do that in one round
        trip (another online store, a cluster): then read separately.

        Raises:
            ServiceUnavailableError: Redis cannot be reached (StoreRefusedError: it refused).
            ValueError: a stored value is not a number (the view was written by something else).
        """
        if self._online_store is None or not user_ids:
            return None
        ids = list(user_ids)
        with translate_redis_errors(f"reading {len(ids)} feature rows", self._address):
            keys = self._keys(ids)
            both = self._online_store.read_values_and(self._config, self._view, keys, self._read_names, command)
        if both is None:
            return None
        stored, reply = both
        return self._decode(ids, stored), reply

    def read_commands(self, user_ids: Sequence[str]) -> list[tuple[Any, ...]] | None:
        """Returns the Redis commands (one per id) whose replies `decode_replies` turns into what
        `read_rows` returns, for a caller that sends them itself on the online store's server
        (the API's asyncio client, in one pipeline with its own reads). None where one pipeline
        cannot read them (another online store, a cluster) or for no ids."""
        if self._online_store is None or not user_ids:
            return None
        return self._online_store.read_commands(self._config, self._view, self._keys(list(user_ids)), self._read_names)

    def decode_replies(self, user_ids: Sequence[str], replies: list[list[bytes | None]]) -> list[FeatureRow | None]:
        """Returns the rows of the replies to `read_commands(user_ids)` (None for an unknown id).

        Raises:
            ValueError: a stored value is not a number (the view was written by something else).
        """
        return self._decode(list(user_ids), replies)

    def _keys(self, ids: list[str]) -> list[EntityKeyProto]:
        value, entity_key = self._value_cls, self._entity_key_cls
        return [entity_key(join_keys=[JOIN_KEY], entity_values=[value(string_val=user_id)]) for user_id in ids]

    def _read_values(self, ids: list[str]) -> list[FeatureRow | None]:
        # Our store hands back the stored bytes; decoding them here is the whole conversion.
        assert self._online_store is not None
        with translate_redis_errors(f"reading {len(ids)} feature rows", self._address):
            stored = self._online_store.read_values(self._config, self._view, self._keys(ids), self._read_names)
        return self._decode(ids, stored)

    def _decode(self, ids: list[str], stored: list[list[bytes | None]]) -> list[FeatureRow | None]:
        decode_value = self._decode_value
        out: list[FeatureRow | None] = []
        for user_id, raw in zip(ids, stored, strict=True):
            numbers = list(map(decode_value, raw))
            last_event = numbers.pop()
            if last_event is None:  # never written
                out.append(None)
                continue
            # A missing value (Feast's materialize stores a NaN float as null) is NaN for the model.
            values = {
                name: _NAN if number is None else int(number) if is_int else float(number)
                for (name, is_int), number in zip(self._int_flags, numbers, strict=True)
            }
            out.append(FeatureRow(user_id=user_id, last_event_ms=int(last_event), values=values))
        return out

    def _to_serialized(self, row: FeatureRow) -> OnlineRow:
        # The bytes `ValueProto.SerializeToString()` would give, without building the protos;
        # map/zip keep the per-value loop in C.
        raw = row.values.__getitem__
        # A cached count is found by any equal number (3.0 finds 3); the rest go through int().
        ints: list[Any] = list(map(self._int_bytes, map(raw, self._int_names)))
        if None in ints:  # numbers the encoder has not cached yet, or not whole
            ints = [self._encode_int64(int(raw(name))) for name in self._int_names]
        values: dict[str, ValueProto | bytes] = dict(zip(self._int_names, ints, strict=True))
        values.update(
            zip(self._float_names, self._encode_doubles(map(float, map(raw, self._float_names))), strict=True)
        )
        values[LAST_EVENT_MS] = self._encode_int64(row.last_event_ms)
        value = self._value_cls
        key = self._entity_key_cls(join_keys=[JOIN_KEY], entity_values=[value(string_val=row.user_id)])
        return key, values, event_time(row.last_event_ms), None

    def _to_protos(self, row: FeatureRow) -> OnlineRow:
        # Building ~40 ValueProtos is most of this path's own cost, and most features are small
        # counts: share one proto per int (Feast only serializes them, never mutates them).
        value, int_value, raw = self._value_cls, self._int_value, row.values
        values = {
            name: int_value(int(raw[name])) if is_int else value(double_val=float(raw[name]))
            for name, is_int in self._int_flags
        }
        values[LAST_EVENT_MS] = value(int64_val=row.last_event_ms)
        key = self._entity_key_cls(join_keys=[JOIN_KEY], entity_values=[value(string_val=row.user_id)])
        return key, values, event_time(row.last_event_ms), None

    def _int_value(self, number: int) -> ValueProto:
        cached = self._int_cache.get(number)
        if cached is None:
            cached = self._value_cls(int64_val=number)
            if len(self._int_cache) < _INT_CACHE_SIZE:
                self._int_cache[number] = cached
        return cached
