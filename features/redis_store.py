"""`ChurnRedisOnlineStore`: Feast's Redis online store with a faster `online_write_batch`.

Configured as `online_store: {type: features.redis_store.ChurnRedisOnlineStore, ...}`; Feast
imports this module and its `ChurnRedisOnlineStoreConfig` from that name. Everything except
the write is Feast's `RedisOnlineStore` unchanged: `online_read`, `materialize`, `teardown`,
cluster. Two methods are added: `read_values`, the HMGET of `online_read` on the same keys and
fields, handing back the stored bytes instead of a `ValueProto` per value (see below), and
`hash_writer`, the write of `online_write_batch` for rows given as plain numbers (`HashWriter`).

The write stores byte for byte what the parent stores (see `RedisOnlineStore.online_write_batch`
with `skip_dedup`): one hash per entity at `serialize_entity_key(key) + project`, one field per
feature named `mmh3("<view>:<feature>")` holding `ValueProto.SerializeToString()`, and the field
`_ts:<view>` holding the serialized event `Timestamp`. What it saves is the parent's per-row
work: the field names are hashed once per view (not once per feature per row), a single-string
entity key is serialized without the generic encoder, the timestamp is encoded without a
`Timestamp` message, and every row goes in one HSET of one pipeline. On a Redis Cluster the rows
are grouped by the master of their key's slot and each master gets its own pipeline, all of them
sent before any reply is read (`core.redis_masters`; after a failure the slot map is asked
again, as redis-py does for its own commands). Through redis-py's cluster pipeline, an object
per command, a row cost the scorer's loop 110-151 us of CPU in `churn bench stream` on the local
clusters; this way 23-29 us.

Besides `ValueProto`s, a row's values may be the already serialized bytes of a `ValueProto`
(from `encode_int64` / `encode_double` here, byte-identical to `SerializeToString()`), which
spares the caller building a message per value just to have it serialized. Only this store
accepts such bytes; `FeastFeatureStore` checks the configured store before passing them.

Reading works the same way round: `read_values` returns the stored bytes, and `decode_value`
turns one into its number (a dict lookup for the common small counts, a struct unpack for a
double), a fraction of the cost of `get_online_features`' generic path (request checks and
grouping, a ValueProto per value, a response proto converted back to Python values).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from itertools import repeat
from operator import itemgetter
from typing import Any, Literal

from feast import FeatureView, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, compute_versioned_name
from feast.infra.online_stores.redis import RedisClient, RedisOnlineStore, RedisOnlineStoreConfig, RedisType
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.protos.feast.types.Value_pb2 import ValueType
from google.protobuf.timestamp_pb2 import Timestamp
from hiredis import pack_command
from redis import Redis
from redis.cluster import RedisCluster
from redis.connection import Connection
from redis.exceptions import ResponseError

from core.redis import fail_fast
from core.redis_masters import execute_by_master, execute_commands_by_master

# One row as `online_write_batch` takes it; values are ValueProtos or their serialized bytes.
WriteRow = tuple[EntityKeyProto, Mapping[str, "ValueProto | bytes"], datetime, datetime | None]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_U64 = (1 << 64) - 1
# ValueProto field tags: int64_val = 4 (varint), double_val = 5 (fixed64). A oneof member is
# serialized even when it is 0, so every value carries its tag.
_INT64_TAG = b"\x20"
_DOUBLE = struct.Struct("<Bd")
_DOUBLE_TAG = 0x29
# Timestamp fields: seconds = 1 (varint), nanos = 2 (varint); plain proto3, so 0 is left out.
_SECONDS_TAG = b"\x08"
_NANOS_TAG = b"\x10"
_U32 = struct.Struct("<I")
_STRING_TYPE = _U32.pack(ValueType.STRING)
# Serialized int64 values kept for reuse: most features are small counts.
_INT_CACHE_SIZE = 100_000
_int_cache: dict[float, bytes] = {}  # int keys; any equal number finds them
_cached_numbers: dict[bytes, int] = {}  # the reverse of _int_cache, for decoding
_framed_ints: dict[float, bytes] = {}  # the same numbers as RESP bulk strings (see `HashWriter`)
# A double value as a RESP bulk string: "$9\r\n", the ValueProto's 9 bytes, "\r\n".
_FRAMED_DOUBLE = struct.Struct("<4sBd2s")
_NUMBER_KINDS = frozenset(("int64_val", "int32_val", "double_val", "float_val"))
_LIST_CACHE_SIZE = 64
_BYTES_ONLY = frozenset((bytes,))
# Packed items (a command, or a row's HSET + EXPIRE) per socket write: Redis starts on a chunk
# while the next one is built.
_CHUNK_ITEMS = 64
_packed_of = itemgetter(1)


def _varint(number: int) -> bytes:
    """Returns protobuf's base-128 varint of `number` (negative: its 64-bit two's complement)."""
    number &= _U64
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def encode_int64(number: int) -> bytes:
    """Returns `ValueProto(int64_val=number).SerializeToString()`, cached for recurring numbers."""
    encoded = _int_cache.get(number)
    if encoded is None:
        if not -(1 << 63) <= number < (1 << 63):
            msg = f"{number} does not fit an int64"
            raise ValueError(msg)
        encoded = _INT64_TAG + _varint(number)
        if len(_int_cache) < _INT_CACHE_SIZE:
            _int_cache[number] = encoded
            _cached_numbers[encoded] = number
            _framed_ints[number] = frame(encoded)
    return encoded


def frame(argument: bytes) -> bytes:
    """Returns `argument` as a RESP bulk string (`$<length>\r\n<bytes>\r\n`), the way
    `hiredis.pack_command` writes each argument of a command."""
    return b"$%d\r\n%b\r\n" % (len(argument), argument)


def encode_double(number: float) -> bytes:
    """Returns `ValueProto(double_val=number).SerializeToString()`."""
    return _DOUBLE.pack(_DOUBLE_TAG, number)


def encode_doubles(numbers: Iterable[float]) -> Iterator[bytes]:
    """Yields `encode_double` of each number (the loop stays in C)."""
    return map(_DOUBLE.pack, repeat(_DOUBLE_TAG), numbers)


# Returns the cached `encode_int64(number)`, or None if that number is not cached yet.
cached_int64: Callable[[float], bytes | None] = _int_cache.get


def decode_value(stored: bytes | None) -> float | None:
    """Returns the number in a serialized `ValueProto`: an int for `int64_val` / `int32_val`, a
    float for `double_val` / `float_val`; None when nothing is stored or the value is null.

    Raises:
        ValueError: the bytes hold another kind of value (a string, a list, ...).
    """
    if not stored:  # never written (None), or a ValueProto with no value set (b"")
        return None
    number = _cached_numbers.get(stored)
    if number is not None:
        return number
    if len(stored) == _DOUBLE.size and stored[0] == _DOUBLE_TAG:
        double: float = _DOUBLE.unpack(stored)[1]
        return double
    value = ValueProto.FromString(stored)
    kind = value.WhichOneof("val")
    if kind in _NUMBER_KINDS:
        found: float = getattr(value, kind)
        return found
    if kind is None or kind == "null_val":
        return None
    msg = f"a stored feature value is a {kind}; expected int64, int32, double or float"
    raise ValueError(msg)


def encode_timestamp(when: datetime) -> bytes:
    """Returns what the parent stores in `_ts:<view>`: `Timestamp.FromDatetime` (a naive time is
    UTC), serialized."""
    if type(when) is not datetime:  # e.g. a pandas Timestamp: let protobuf convert it
        ts = Timestamp()
        ts.FromDatetime(when if when.tzinfo is not None else when.replace(tzinfo=UTC))
        return ts.SerializeToString()
    delta = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)) - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    nanos = when.microsecond * 1_000
    out = _SECONDS_TAG + _varint(seconds) if seconds else b""
    return out + _NANOS_TAG + _varint(nanos) if nanos else out


def encode_timestamp_ms(epoch_ms: int) -> bytes:
    """Returns `encode_timestamp` of the UTC time `epoch_ms` milliseconds after the epoch."""
    seconds, millis = divmod(epoch_ms, 1000)  # floor, as a datetime before 1970 has it
    out = _SECONDS_TAG + _varint(seconds) if seconds else b""
    return out + _NANOS_TAG + _varint(millis * 1_000_000) if millis else out


for _number in range(4_096):  # counts: the common case
    encode_int64(_number)


class ChurnRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """`RedisOnlineStoreConfig` under this store's type name (`features.feast_repo.ONLINE_STORE_TYPE`);
    same options, same meaning."""

    type: Literal["features.redis_store.ChurnRedisOnlineStore"] = "features.redis_store.ChurnRedisOnlineStore"  # type: ignore[assignment]
    """Online store type selector"""


class _ViewLayout:
    """The Redis layout of one feature view in one project, computed once and reused."""

    __slots__ = ("fields", "key_version", "lists", "prefixes", "project", "ts_field", "view_name")

    def __init__(self, view_name: str, project: str, key_version: int) -> None:
        self.view_name = view_name
        self.project = project.encode("utf-8")
        self.key_version = key_version
        self.ts_field = f"_ts:{view_name}".encode()
        self.fields: dict[str, bytes] = {}
        # a row's feature names, in its order -> their fields (rows of one writer share one order)
        self.lists: dict[tuple[str, ...], list[bytes]] = {}
        # join key -> the serialized key up to the value bytes (single-string-key fast path)
        self.prefixes: dict[str, bytes] = {}

    def field(self, feature: str) -> bytes:
        """Returns the hash field of `feature`: the parent's `_mmh3(f"{view}:{feature}")`."""
        name = self.fields.get(feature)
        if name is None:
            name = self.fields[feature] = _mmh3(f"{self.view_name}:{feature}")
        return name

    def field_list(self, names: tuple[str, ...]) -> list[bytes]:
        """Returns the fields of `names`, in order; the last few name orders are cached."""
        fields = [self.field(name) for name in names]
        if len(self.lists) >= _LIST_CACHE_SIZE:
            self.lists.clear()
        self.lists[names] = fields
        return fields

    def redis_key(self, entity_key: EntityKeyProto) -> bytes:
        """Returns the parent's `_redis_key(project, entity_key)`."""
        join_keys = entity_key.join_keys
        if self.key_version == 3 and len(join_keys) == 1:
            value = entity_key.entity_values[0]
            if value.WhichOneof("val") == "string_val":
                return self.string_key(join_keys[0], value.string_val)
        return serialize_entity_key(entity_key, entity_key_serialization_version=self.key_version) + self.project

    def string_key(self, join_key: str, value: str) -> bytes:
        """Returns the parent's key of the entity `join_key = value` (one string join key, entity
        key serialization version 3)."""
        prefix = self.prefixes.get(join_key)
        if prefix is None:
            encoded = join_key.encode("utf8")
            prefix = self.prefixes[join_key] = b"".join(
                (_U32.pack(1), _STRING_TYPE, _U32.pack(len(encoded)), encoded, _STRING_TYPE)
            )
        raw = value.encode("utf8")
        return b"".join((prefix, _U32.pack(len(raw)), raw, self.project))


def _as_proto(value: ValueProto | bytes) -> ValueProto:
    return ValueProto.FromString(value) if isinstance(value, bytes) else value


class ChurnRedisOnlineStore(RedisOnlineStore):
    """Feast's `RedisOnlineStore` with a leaner `online_write_batch` (same keys, same bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self._layouts: dict[tuple[str, str, int], _ViewLayout] = {}
        self._writers: dict[tuple[Any, ...], HashWriter] = {}

    def _get_client(self, online_store_config: RedisOnlineStoreConfig) -> Any:
        """Feast's client; a `RedisCluster` one set as the project's own (`core.redis.fail_fast`:
        Feast's connection string cannot say so)."""
        client = super()._get_client(online_store_config)
        return fail_fast(client) if isinstance(client, RedisCluster) else client

    def layout(self, config: RepoConfig, table: FeatureView) -> _ViewLayout:
        """Returns the (cached) key and field layout of `table` in `config.project`."""
        view_name = compute_versioned_name(table, config.registry.enable_online_feature_view_versioning)
        cache_key = (view_name, config.project, config.entity_key_serialization_version)
        layout = self._layouts.get(cache_key)
        if layout is None:
            layout = self._layouts[cache_key] = _ViewLayout(*cache_key)
        return layout

    def read_values(
        self,
        config: RepoConfig,
        table: FeatureView,
        entity_keys: Sequence[EntityKeyProto],
        features: tuple[str, ...],
    ) -> list[list[bytes | None]]:
        """Returns, per entity, the stored bytes of each of `features` (None where nothing is
        stored): the HMGET `online_read` sends, on the same keys and fields (less the timestamp),
        without parsing a `ValueProto` per value. One HMGET for one entity, else one pipeline
        (Feast's own read; on a cluster, one per master: `core.redis_masters`).

        Raises:
            redis.exceptions.RedisError: Redis is unreachable or refused the command.
        """
        layout = self.layout(config, table)
        fields = layout.lists.get(features) or layout.field_list(features)
        keys = [layout.redis_key(entity_key) for entity_key in entity_keys]
        online_config = config.online_store
        assert isinstance(online_config, RedisOnlineStoreConfig)
        if len(keys) == 1 and online_config.client != RedisClient.glide:
            # A one-command pipeline costs more than the command (for Redis Cluster as well).
            return [self._get_client(online_config).hmget(keys[0], fields)]
        client = self._get_client(online_config)
        if isinstance(client, RedisCluster):  # each master its HMGETs; a hung one costs one timeout
            return execute_commands_by_master(client, [("HMGET", key, *fields) for key in keys])
        # Feast's own pipelined read; redis-py answers bulk strings as bytes.
        replies: list[list[Any]] = self._read_hash_fields(config, [(key, list(fields)) for key in keys])
        return replies

    def read_values_and(
        self,
        config: RepoConfig,
        table: FeatureView,
        entity_keys: Sequence[EntityKeyProto],
        features: tuple[str, ...],
        command: Sequence[Any],
    ) -> tuple[list[list[bytes | None]], Any] | None:
        """Returns what `read_values` returns and the reply of `command` (e.g. `("MGET", key, ...)`
        of rows kept beside the features on the same server), all in one pipeline: one round trip.
        None where that is not one round trip (a Redis Cluster, Sentinel or the GLIDE client):
        read separately there.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable or refused a command.
        """
        commands = self.read_commands(config, table, entity_keys, features)
        if commands is None:
            return None
        with self._get_client(config.online_store).pipeline(transaction=False) as pipe:
            for read in commands:
                pipe.execute_command(*read)
            pipe.execute_command(*command)
            replies: list[Any] = pipe.execute()
        return replies[:-1], replies[-1]

    def read_commands(
        self, config: RepoConfig, table: FeatureView, entity_keys: Sequence[EntityKeyProto], features: tuple[str, ...]
    ) -> list[tuple[Any, ...]] | None:
        """Returns the Redis commands (one HMGET per entity key) whose replies are what
        `read_values` returns, for a caller that sends them itself (e.g. with an asyncio client,
        pipelined with its own reads); None where one pipeline to one server cannot read them (a
        Redis Cluster, Sentinel or the GLIDE client)."""
        online_config = config.online_store
        assert isinstance(online_config, RedisOnlineStoreConfig)
        if online_config.client == RedisClient.glide or online_config.redis_type != RedisType.redis:
            return None
        layout = self.layout(config, table)
        fields = layout.lists.get(features) or layout.field_list(features)
        return [("HMGET", layout.redis_key(entity_key), *fields) for entity_key in entity_keys]

    def hash_writer(
        self,
        config: RepoConfig,
        table: FeatureView,
        join_key: str,
        int_names: Sequence[str],
        float_names: Sequence[str],
        event_ms_name: str,
    ) -> HashWriter | None:
        """Returns a writer of rows with these int and double features in this order, and the
        event time in ms as the int feature `event_ms_name` (see `HashWriter`), on one Redis
        server or a Redis Cluster; or None where `online_write_batch` must do the write: Feast's
        dedup is on, entity keys are not serialized with version 3, or Feast built another client.
        """
        online_config = config.online_store
        assert isinstance(online_config, RedisOnlineStoreConfig)
        if not online_config.skip_dedup or config.entity_key_serialization_version != 3:
            return None
        client = self._get_client(online_config)
        if not isinstance(client, Redis | RedisCluster):
            return None
        layout = self.layout(config, table)
        ttl = online_config.key_ttl_seconds
        cache_key = (id(layout), join_key, tuple(int_names), tuple(float_names), event_ms_name, ttl)
        writer = self._writers.get(cache_key)
        if writer is None:
            writer = HashWriter(layout, join_key, (int_names, float_names, event_ms_name), ttl)
            self._writers[cache_key] = writer
        writer.client = client
        return writer

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: Sequence[WriteRow],
        progress: Callable[[int], Any] | None,
    ) -> None:
        """Upserts the rows like the parent, in one pipeline of one HSET (+ EXPIRE) per row.

        Without `skip_dedup` this is the parent's read-compare-write, unchanged.
        """
        online_config = config.online_store
        assert isinstance(online_config, RedisOnlineStoreConfig)
        if not online_config.skip_dedup:
            rows = [
                (key, {name: _as_proto(v) for name, v in values.items()}, ts, created)
                for key, values, ts, created in data
            ]
            super().online_write_batch(config, table, rows, progress)
            return
        ttl = online_config.key_ttl_seconds
        commands = self._commands(self.layout(config, table), data, ttl)
        client = self._get_client(online_config)
        if isinstance(client, Redis):  # one server (also Sentinel's master): stream the commands
            results = _send_and_check(client, map(pack_command, commands))
        elif isinstance(client, RedisCluster):  # each command to its key's master
            results = len(execute_commands_by_master(client, commands))
        else:  # another client Feast builds: its own pipeline
            with client.pipeline(transaction=False) as pipe:
                for name, *args in commands:
                    pipe.execute_command(name.decode(), *args)  # redis-py routes by a str command name
                results = len(pipe.execute())
        if progress:
            progress(results)

    @staticmethod
    def _commands(layout: _ViewLayout, data: Sequence[WriteRow], ttl: int | None) -> Iterator[tuple[Any, ...]]:
        """Yields the parent's commands for the rows: `HSET key _ts:<view> <ts> field value ...`
        (+ `EXPIRE key ttl`)."""
        field_lists, field_list, redis_key, ts_field = (
            layout.lists,
            layout.field_list,
            layout.redis_key,
            layout.ts_field,
        )
        for entity_key, values, timestamp, _ in data:
            key = redis_key(entity_key)
            names = tuple(values)
            fields = field_lists.get(names) or field_list(names)
            encoded: list[Any] = list(values.values())
            if not _BYTES_ONLY.issuperset(map(type, encoded)):
                encoded = [v if isinstance(v, bytes) else v.SerializeToString() for v in encoded]
            pairs: list[Any] = [None] * (2 * len(names))
            pairs[::2] = fields
            pairs[1::2] = encoded
            yield (b"HSET", key, ts_field, encode_timestamp(timestamp), *pairs)
            if ttl:
                yield (b"EXPIRE", key, ttl)


class HashWriter:
    """Writes rows of one view as `online_write_batch` with `skip_dedup` does (same keys, same
    fields, same bytes, same EXPIRE), given as plain numbers in a fixed feature order.

    The HSET of a row is built as the bytes Redis receives: the field names framed as RESP bulk
    strings once, the values framed as they are encoded (counts from a cache, doubles by one
    struct pack). Going through ValueProto bytes, a command tuple and `hiredis.pack_command`
    per row cost ~26 us of CPU a row; this costs about a quarter of that.
    """

    def __init__(
        self,
        layout: _ViewLayout,
        join_key: str,
        names: tuple[Sequence[str], Sequence[str], str],  # int features, double features, event ms
        ttl: int | None,
    ) -> None:
        self.client: Redis | RedisCluster | None = None  # set by `ChurnRedisOnlineStore.hash_writer`
        self._layout = layout
        self._join_key = join_key
        int_names, float_names, event_ms_name = names
        self._fields = [frame(layout.field(name)) for name in (*int_names, event_ms_name, *float_names)]
        self._head = b"*%d\r\n$4\r\nHSET\r\n" % (4 + 2 * len(self._fields))
        self._ts_field = frame(layout.ts_field)
        self._expire = b"" if not ttl else b"*3\r\n$6\r\nEXPIRE\r\n%%b%b" % frame(str(ttl).encode())

    def write(self, rows: Iterable[tuple[str, int, Sequence[float], Sequence[float]]]) -> int:
        """Upserts rows of (entity value, event time in epoch ms, int features, double features);
        ints given as floats are truncated with `int()`. Returns the number of commands sent.

        Raises:
            redis.exceptions.ConnectionError, TimeoutError: Redis is unreachable.
            redis.exceptions.ResponseError: Redis refused a command (the other rows landed); on a
                cluster also MOVED / ASK (a slot moved: the slot map is asked again, retry).
            redis.exceptions.RedisClusterException: no node of a cluster answered.
            ValueError: an int feature does not fit an int64.
        """
        client = self.client
        assert client is not None
        replies_each = 2 if self._expire else 1
        if isinstance(client, RedisCluster):
            return len(execute_by_master(client, self._commands(rows), replies_each))
        return _send_and_check(client, map(_packed_of, self._commands(rows)), replies_each)

    def _commands(
        self, rows: Iterable[tuple[str, int, Sequence[float], Sequence[float]]]
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yields per row its Redis key and its packed HSET (+ EXPIRE)."""
        string_key, join_key, fields, head, ts_field = (
            self._layout.string_key,
            self._join_key,
            self._fields,
            self._head,
            self._ts_field,
        )
        framed_ints, width, expire = _framed_ints.get, 2 * len(fields), self._expire
        for value, event_ms, ints, doubles in rows:
            raw_key = string_key(join_key, value)
            key = frame(raw_key)
            values: list[bytes | None] = list(map(framed_ints, ints))
            if None in values:  # numbers not cached, or not whole
                values = [frame(encode_int64(int(number))) for number in ints]
            values.append(frame(_INT64_TAG + _varint(event_ms)))  # not cached: nearly every one differs
            values += map(_FRAMED_DOUBLE.pack, repeat(b"$9\r\n"), repeat(_DOUBLE_TAG), doubles, repeat(b"\r\n"))
            parts: list[Any] = [None] * width
            parts[::2] = fields
            parts[1::2] = values
            hset = b"".join((head, key, ts_field, frame(encode_timestamp_ms(event_ms)), *parts))
            yield raw_key, (hset + expire % key if expire else hset)


def _send_and_check(client: Redis, packed: Iterable[bytes], replies_each: int = 1) -> int:
    """Sends the packed items (each `replies_each` commands) on one pooled connection, in chunks
    while they are built (Redis works on one chunk while the next is packed), then reads every
    reply; returns how many commands were sent.

    The same wire traffic as a non-transactional pipeline, without its per-command bookkeeping.

    Raises:
        redis.exceptions.ConnectionError, TimeoutError: Redis is unreachable (the connection is
            dropped, not returned to the pool half-read).
        redis.exceptions.ResponseError: Redis refused a command (the first error, after all
            replies were read).
    """
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        sent = 0
        chunk: list[bytes] = []
        for item in packed:
            chunk.append(item)
            if len(chunk) == _CHUNK_ITEMS:
                connection.send_packed_command([b"".join(chunk)], check_health=False)
                sent += len(chunk)
                chunk.clear()
        if chunk:
            connection.send_packed_command([b"".join(chunk)], check_health=False)
            sent += len(chunk)
        first_error = _read_replies(connection, sent * replies_each)
    except BaseException:
        connection.disconnect()  # replies may be unread: never reuse this connection
        raise
    finally:
        pool.release(connection)
    if first_error is not None:
        raise first_error
    return sent * replies_each


def _read_replies(connection: Connection, count: int) -> ResponseError | None:
    """Reads `count` replies; returns the first refusal among them (None if there is none).

    Raises:
        redis.exceptions.ConnectionError, TimeoutError: the server stopped answering.
    """
    first_error: ResponseError | None = None
    for _ in range(count):
        try:
            connection.read_response()
        except ResponseError as exc:
            first_error = first_error or exc
    return first_error
