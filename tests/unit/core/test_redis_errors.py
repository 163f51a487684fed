"""One classification of Redis errors (`core.redis`): transient ones retry, refusals are named."""

from __future__ import annotations

import pytest
import redis.exceptions as rex

from core.errors import ServiceUnavailableError, StoreRefusedError
from core.redis import classify, redis_client, redis_errors
from core.settings import load_settings

TRANSIENT = [
    rex.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    rex.TimeoutError("Timeout reading from socket"),
    rex.BusyLoadingError("Redis is loading the dataset in memory"),
    rex.ResponseError("BUSY Redis is busy running a script."),
    rex.TryAgainError("Multiple keys request during rehashing of slot"),
    # A slot served elsewhere now (the per-master Feast writer asks for the slot map again):
    # redis-py strips the code, so these were refusals named "ERR".
    rex.MovedError("3999 127.0.0.1:16480"),
    rex.AskError("3999 127.0.0.1:16480"),
    # Cluster client errors are not RedisErrors: these two escaped as unknown exceptions.
    rex.SlotNotCoveredError('Slot "42" is not covered by the cluster.'),
    rex.RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node: x"),
]
# (error as redis-py raises it, expected code): redis-py strips the code of the errors it has a class for.
REFUSED = [
    (rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "OOM"),  # type: ignore[attr-defined]
    (rex.ReadOnlyError("You can't write against a read only replica."), "READONLY"),
    (rex.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's unable to persist"), "MISCONF"),
    (rex.AuthenticationError("invalid username-password pair or user is disabled."), "AUTH"),
    (rex.AuthenticationError("Authentication required."), "AUTH"),
    (rex.NoPermissionError("this user has no permissions to run the 'set' command"), "NOPERM"),
    (rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), "WRONGTYPE"),
    (rex.RedisClusterException("Keys in request don't hash to the same slot"), "RedisClusterException"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_errors_are_unavailable_and_retried(error: Exception) -> None:
    assert classify(error) is None
    with pytest.raises(ServiceUnavailableError) as raised, redis_errors("saving user states"):
        raise error
    assert not isinstance(raised.value, StoreRefusedError)
    assert raised.value.http_status == 503
    assert "Redis unavailable while saving user states" in str(raised.value)


@pytest.mark.parametrize(("error", "code"), REFUSED, ids=[c for _, c in REFUSED])
def test_lasting_refusals_carry_their_code(error: Exception, code: str) -> None:
    assert classify(error) == code
    with pytest.raises(StoreRefusedError) as raised, redis_errors("writing risk rows", "Redis at x"):
        raise error
    assert raised.value.reason == code
    assert raised.value.http_status == 503  # the API answers 503 with the reason, never 500
    assert f"Redis at x refused writing risk rows ({code})" in str(raised.value)


def test_client_side_errors_are_not_redis_answers() -> None:
    with pytest.raises(ValueError, match="bad"), redis_errors("anything"):
        raise ValueError("bad")


def test_a_cluster_no_node_of_which_answers_is_unavailable_not_an_unknown_error() -> None:
    """redis-py's own words for it (a contract test): a cluster client asks its seed node for the
    slot map when it is built, and again after a failed command."""
    settings = load_settings(redis_cluster=True, redis_url="redis://:secret@127.0.0.1:1/0")
    with pytest.raises(ServiceUnavailableError, match=r"Redis Cluster at redis://:\*\*\*@127.0.0.1:1/0 unavailable"):
        redis_client(settings, "probe")
