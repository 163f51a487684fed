"""The one place Redis clients are built and Redis errors become `ServiceUnavailableError`.

Timeouts depend on who waits: a request path (the API) fails fast so the caller gets a 503
quickly; batch work (the scorer, commands) waits longer through a slow moment; a probe
(`churn infra status`) waits least. Feast's own connection string for the online store is
built in `features.feast_repo` from the same URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import redis
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.errors import ServiceUnavailableError
from core.settings import Settings

Purpose = Literal["batch", "request", "probe"]
# (socket timeout, connect timeout) in seconds.
TIMEOUTS: dict[str, tuple[float, float]] = {"batch": (5.0, 2.0), "request": (2.0, 1.0), "probe": (1.0, 1.0)}
# Errors that mean "Redis cannot be reached" (as opposed to a command Redis refused).
UNREACHABLE: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    RedisClusterException,
)


def redis_client(settings: Settings, purpose: Purpose = "batch") -> redis.Redis:
    """Returns a client of `settings.redis_address` with the timeouts of `purpose` (no I/O yet)."""
    socket_timeout, connect_timeout = TIMEOUTS[purpose]
    return redis.Redis.from_url(
        settings.redis_address, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout
    )


@contextmanager
def redis_errors(
    action: str, where: str = "Redis", catch: tuple[type[Exception], ...] = (redis.RedisError,)
) -> Iterator[None]:
    """Turns the Redis errors in `catch` raised inside the block into ServiceUnavailableError
    (HTTP 503) saying `where` failed while doing `action`.

    Raises:
        ServiceUnavailableError: the block raised one of `catch`.
    """
    try:
        yield
    except catch as exc:
        msg = f"{where} unavailable while {action}: {exc}"
        raise ServiceUnavailableError(msg) from exc
