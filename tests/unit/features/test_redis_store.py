"""`features.redis_store`: the same keys and bytes as Feast's RedisOnlineStore (no services)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from core.settings import load_settings
from features.feast_repo import ONLINE_STORE_TYPE, repo_config, repo_objects
from features.feast_store import event_time
from features.redis_store import (
    ChurnRedisOnlineStore,
    ChurnRedisOnlineStoreConfig,
    decode_value,
    encode_double,
    encode_int64,
    encode_timestamp,
    encode_timestamp_ms,
    frame,
)


def test_config_type_resolves_to_our_store(tmp_path: Path) -> None:
    from feast.infra.online_stores.helpers import get_online_store_from_config
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig

    for cluster in (False, True):
        config = repo_config(load_settings(state_dir=tmp_path, redis_port=16379, redis_cluster=cluster))
        assert type(config.online_store) is ChurnRedisOnlineStoreConfig
        assert isinstance(config.online_store, RedisOnlineStoreConfig)  # the parent's asserts hold
        assert config.online_store.type == ONLINE_STORE_TYPE
        assert type(get_online_store_from_config(config.online_store)) is ChurnRedisOnlineStore


INTS = [0, 1, 2, 127, 128, 300, 16_383, 16_384, 99_999, 100_000, 1_767_225_600_123, 2**63 - 1, -1, -300, -(2**63)]


@pytest.mark.parametrize("number", INTS)
def test_int64_bytes_are_the_protos(number: int) -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    assert encode_int64(number) == Value(int64_val=number).SerializeToString()
    assert encode_int64(number) == Value(int64_val=number).SerializeToString()  # from the cache
    assert Value.FromString(encode_int64(number)).int64_val == number


def test_int64_out_of_range_is_refused() -> None:

    for number in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="int64"):
            encode_int64(number)


DOUBLES = [0.0, -0.0, 1.0, 1 / 3, -2.5, 1e-300, 1e300, math.inf, -math.inf, 5e-324]


@pytest.mark.parametrize("number", DOUBLES)
def test_double_bytes_are_the_protos(number: float) -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    assert encode_double(number) == Value(double_val=number).SerializeToString()
    decoded = Value.FromString(encode_double(number))
    assert decoded.WhichOneof("val") == "double_val"
    assert math.copysign(1, decoded.double_val) == math.copysign(1, number)
    assert decoded.double_val == number


def test_nan_decodes_as_nan() -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    assert math.isnan(Value.FromString(encode_double(math.nan)).double_val)


@pytest.mark.parametrize(
    ("kind", "number"),
    [("int64_val", n) for n in INTS]
    + [("double_val", x) for x in DOUBLES]
    + [("int32_val", -7), ("int32_val", 0), ("float_val", 0.5)],
)
def test_decoded_values_are_the_protos(kind: str, number: float) -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    value = Value()
    setattr(value, kind, number)
    got = decode_value(value.SerializeToString())
    assert got == number
    assert type(got) is type(number)
    assert math.copysign(1, got) == math.copysign(1, number)  # -0.0 stays -0.0


def test_nothing_stored_or_null_decodes_as_none_and_nan_as_nan() -> None:
    from feast.protos.feast.types.Value_pb2 import Null, Value

    assert decode_value(None) is None  # the field was never written
    assert decode_value(Value().SerializeToString()) is None  # b"": no value set
    assert decode_value(Value(null_val=Null.NULL).SerializeToString()) is None
    assert math.isnan(decode_value(encode_double(math.nan)) or 0.0)


def test_a_value_that_is_not_a_number_is_refused() -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    with pytest.raises(ValueError, match="string_val"):
        decode_value(Value(string_val="x").SerializeToString())


TIMES = [
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(2026, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC),
    datetime(2026, 1, 1, 0, 0, 7, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(2026, 3, 1, 12, 30, 0, 5, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
    datetime(2026, 3, 1, 12, 30, 0, 5),  # naive: UTC, as Feast assumes  # noqa: DTZ001
]


@pytest.mark.parametrize("when", TIMES)
def test_timestamp_bytes_are_the_parents(when: datetime) -> None:
    from feast.utils import make_tzaware
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromDatetime(make_tzaware(when))
    assert encode_timestamp(when) == ts.SerializeToString()


@pytest.mark.parametrize("epoch_ms", [0, 1, 999, 1_000, 1_767_225_600_123, -1, -1_001, -62_135_596_800_000])
def test_timestamp_from_epoch_ms_is_the_datetimes(epoch_ms: int) -> None:

    assert encode_timestamp_ms(epoch_ms) == encode_timestamp(event_time(epoch_ms))


def test_framing_is_hiredis_framing() -> None:
    from hiredis import pack_command

    for argument in (b"", b"x", b"\r\n$3", bytes(range(256))):
        command: Any = (b"GET", argument)  # hiredis' stub types a 1-tuple
        assert pack_command(command) == b"*2\r\n$3\r\nGET\r\n" + frame(argument)


def test_pandas_timestamp_takes_the_protobuf_route() -> None:
    import pandas as pd
    from google.protobuf.timestamp_pb2 import Timestamp

    when = pd.Timestamp("2026-01-01T00:00:00.123456789Z")
    ts = Timestamp()
    ts.FromDatetime(when)
    assert encode_timestamp(when) == ts.SerializeToString()


def test_keys_and_fields_are_the_parents(tmp_path: Path) -> None:
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    settings = load_settings(state_dir=tmp_path, redis_port=16379, feast_project="unit_test")
    *_, view = repo_objects(settings)
    layout = ChurnRedisOnlineStore().layout(repo_config(settings), view)
    keys = [
        EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=user)])
        for user in ("u1", "", "ünï", "x" * 300)
    ]
    keys += [
        EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=7)]),
        EntityKey(join_keys=["b", "a"], entity_values=[Value(string_val="1"), Value(int64_val=2)]),
    ]
    for key in keys:
        assert layout.redis_key(key) == _redis_key("unit_test", key, entity_key_serialization_version=3)
    for field in view.features:
        assert layout.field(field.name) == _mmh3(f"{view.name}:{field.name}")
    assert layout.ts_field == f"_ts:{view.name}".encode()
