"""`core.redis_pipeline` without a server: URLs, packing and how refusals map to redis-py's errors."""

from __future__ import annotations

import hiredis
import pytest
import redis.exceptions as rex

from core.errors import ConfigError, ServiceUnavailableError, StoreRefusedError
from core.redis import async_redis_client, redis_errors
from core.redis_pipeline import AsyncPipelineClient, pack, refusal
from core.settings import Settings


def test_commands_are_packed_in_the_redis_protocol_one_after_the_other() -> None:
    assert pack([("GET", "k"), ("MGET", b"a", 1)]) == (
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n" + b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$1\r\n1\r\n"
    )


def test_a_url_gives_the_server_and_the_greeting_of_each_new_connection() -> None:
    client = AsyncPipelineClient("redis://scorer:p%40ss@cache.internal:7000/3", 2.0, 1.0)
    assert (client.host, client.port, client.ssl) == ("cache.internal", 7000, None)
    assert client.greeting == pack([("AUTH", "scorer", "p@ss"), ("SELECT", 3)])
    assert AsyncPipelineClient("redis://:secret@h/0", 2.0, 1.0).greeting == pack([("AUTH", "secret")])
    plain = AsyncPipelineClient("redis://h", 2.0, 1.0)
    assert (plain.port, plain.greeting) == (6379, b"")
    assert AsyncPipelineClient("rediss://h:6380/0", 2.0, 1.0).ssl is not None
    # An ACL user without a password (`nopass`) still names itself, as with redis-py.
    assert AsyncPipelineClient("redis://scorer@h/0", 2.0, 1.0).greeting == pack([("AUTH", "scorer", "")])


def test_a_url_with_options_is_refused_without_showing_its_password() -> None:
    with pytest.raises(ConfigError, match="without options") as raised:
        async_redis_client(Settings(redis_url="redis://u:hunter2@h:6379/0?ssl_cert_reqs=none"))
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("url", ["unix:///tmp/redis.sock", "http://h:6379", "redis://", "redis:///0"])
def test_a_url_that_is_not_one_redis_server_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="CHURN_REDIS_URL"):
        async_redis_client(Settings(redis_url=url))


@pytest.mark.parametrize(
    ("reply", "kind", "code"),
    [
        ("WRONGPASS invalid username-password pair or user is disabled.", rex.AuthenticationError, "AUTH"),
        ("NOAUTH Authentication required.", rex.AuthenticationError, "AUTH"),
        ("OOM command not allowed when used memory > 'maxmemory'.", rex.ResponseError, "OOM"),
        ("READONLY You can't write against a read only replica.", rex.ResponseError, "READONLY"),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", rex.ResponseError, "WRONGTYPE"),
        ("ERR invalid password", rex.AuthenticationError, "AUTH"),
        (
            "ERR AUTH <password> called without any password configured for the default user.",
            rex.AuthenticationError,
            "AUTH",
        ),
        ("ERR unknown command 'FOO'", rex.ResponseError, "ERR"),
    ],
)
def test_a_refusal_is_the_error_redis_py_raises_and_is_classified_alike(
    reply: str, kind: type[Exception], code: str
) -> None:
    error = refusal(hiredis.ReplyError(reply))
    assert type(error) is kind
    with pytest.raises(StoreRefusedError) as raised, redis_errors("reading rows"):
        raise error
    assert raised.value.reason == code


@pytest.mark.parametrize(
    "reply", ["LOADING Redis is loading the dataset in memory", "ERR max number of clients reached"]
)
def test_a_transient_refusal_is_unavailable_not_refused(reply: str) -> None:
    with pytest.raises(ServiceUnavailableError) as raised, redis_errors("reading rows"):
        raise refusal(hiredis.ReplyError(reply))
    assert not isinstance(raised.value, StoreRefusedError)
    assert "Redis unavailable while reading rows" in str(raised.value)
