"""The one place Redis clients are built and Redis errors become `ServiceUnavailableError`.

Timeouts depend on who waits: a request path (the API) fails fast so the caller gets a 503
quickly; batch work (the scorer, commands) waits longer through a slow moment; a probe
(`churn infra status`) waits least. Feast's own connection string for the online store is
built in `features.feast_repo` from the same URL.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoPermissionError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from core.errors import ConfigError, ServiceUnavailableError, StoreRefusedError
from core.redis_masters import execute_commands_by_master
from core.redis_pipeline import AsyncPipelineClient
from core.settings import Settings, mask_url

Purpose = Literal["batch", "request", "probe"]
# (socket timeout, connect timeout) in seconds.
TIMEOUTS: dict[str, tuple[float, float]] = {"batch": (5.0, 2.0), "request": (2.0, 1.0), "probe": (1.0, 1.0)}
# Errors that mean "Redis cannot be reached" (as opposed to a command Redis refused).
UNREACHABLE: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    SlotNotCoveredError,
)
# How redis-py says that no node of a cluster answered (a RedisClusterException, which is not a
# RedisError; its other uses are refusals of the client itself, e.g. keys of several slots).
CLUSTER_UNREACHABLE = "cannot be connected"


# A client of one Redis server, or of a Redis Cluster (`CHURN_REDIS_CLUSTER`).
FAIL_FAST = Retry(NoBackoff(), 0)
Client = redis.Redis | RedisCluster


def redis_client(settings: Settings, purpose: Purpose = "batch") -> Client:
    """Returns a client of `settings.redis_address` with the timeouts of `purpose`: a
    `RedisCluster` seeded from that address when `settings.redis_cluster` is set (it asks for the
    other nodes at once, and follows a failover), else a `redis.Redis` (no I/O yet).

    Raises:
        ServiceUnavailableError: a cluster whose seed node does not answer.
    """
    socket_timeout, connect_timeout = TIMEOUTS[purpose]
    if settings.redis_cluster:
        with redis_errors("asking for its nodes", f"Redis Cluster at {mask_url(settings.redis_address)}"):
            return fail_fast(
                RedisCluster.from_url(
                    settings.redis_address,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=connect_timeout,
                    retry=FAIL_FAST,  # from the first command: the seed node is asked once
                )
            )
    return redis.Redis.from_url(
        settings.redis_address, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout
    )


def fail_fast(cluster: RedisCluster) -> RedisCluster:
    """Returns `cluster` set to fail fast and to learn a failover at the first failure:
    - no retries inside the client (`FAIL_FAST`): its default sleeps up to ~7 s in one command
      while a master fails over; the error reaches the caller at once, the scorer reports not
      ready and retries the batch with its own backoff, the API answers 503;
    - the slot map is asked again after every failed command (`reinitialize_steps` 1; redis-py
      asks after every fifth). A pipeline re-sends, one by one, the commands a node failed: with
      the map of before a failover, each one went to the old master, and a hung (not dead) one
      made each wait out the socket timeout. Asked again first, they go to the promoted replica.
      The cost: while an operator moves slots, each MOVED reply also asks for the whole map
      (CLUSTER SLOTS) instead of patching one slot, at most once per moved slot per client.
    """
    anything: Any = cluster  # redis-py's stubs lack `retry` / `set_retry`
    if anything.retry is not FAIL_FAST:
        anything.set_retry(FAIL_FAST)
    cluster.reinitialize_steps = 1
    return cluster


def async_redis_client(settings: Settings, purpose: Purpose = "request") -> AsyncPipelineClient:
    """Returns an asyncio pipeline client of the one Redis server at `settings.redis_address`
    with the timeouts of `purpose` (no I/O yet: connections open on the event loop that first
    uses it). For a server, not a cluster: the API reads through it only where one pipeline
    reaches every key it reads (see `serving.deps`).

    Raises:
        ConfigError: the URL is not a `redis://` or `rediss://` URL with a host.
    """
    socket_timeout, connect_timeout = TIMEOUTS[purpose]
    try:
        return AsyncPipelineClient(settings.redis_address, socket_timeout, connect_timeout)
    except ValueError as exc:
        msg = f"CHURN_REDIS_URL: {exc}"
        raise ConfigError(msg) from exc


# --- key naming: one user's keys share a slot ----------------------------------------------
# Every per-user key carries a hash tag `{t}` naming one of `SLOT_GROUPS` groups (by a CRC-32 of
# the user id), so on a Redis Cluster all of one user's keys (state, risk row) sit in one slot,
# and a batch's multi-key writes go as one script or command per group. The group tags are picked
# so that group i hashes into the i-th of `SLOT_GROUPS` equal ranges of the 16,384 slots: the
# groups spread evenly over the masters, and every master of a cluster of up to `SLOT_GROUPS`
# masters holds at least one group (the scorer keeps its applied offsets once per group, so a
# master that lost writes in a failover is noticed; see `features.state_store`). Not the user id
# as the tag: then a batch would need a script per user, and the applied offsets a copy per slot.
SLOT_GROUPS = 64


@cache
def group_tags() -> tuple[str, ...]:
    """Returns the hash tag (`{...}`, braces included) of every slot group, group i first."""
    width = REDIS_CLUSTER_HASH_SLOTS // SLOT_GROUPS
    tags: dict[int, str] = {}
    candidate = 0
    while len(tags) < SLOT_GROUPS:
        text = format(candidate, "x")
        tags.setdefault(key_slot(text.encode()) // width, text)
        candidate += 1
    return tuple("{" + tags[i] + "}" for i in range(SLOT_GROUPS))


def user_tag(user_id: str) -> str:
    """Returns the hash tag (`{...}`) of `user_id`'s slot group."""
    return group_tags()[zlib.crc32(user_id.encode()) % SLOT_GROUPS]


def user_key(prefix: str, user_id: str) -> str:
    """Returns the Redis key of `user_id` under `prefix`: `<prefix>{<group>}<user_id>`. The one
    place per-user keys are named (states, risk rows)."""
    return f"{prefix}{user_tag(user_id)}{user_id}"


def mget(client: Client, keys: Sequence[str | bytes]) -> list[Any]:
    """Returns the values of `keys` (None where missing), in order: one MGET on one server or
    for keys of one slot (one user's, say); else on a cluster, one MGET per slot, each master's
    on one connection (`core.redis_masters`).

    Not through redis-py's cluster pipeline (`mget_nonatomic`): it re-sends, one by one, the
    commands of a node that timed out, so a hung master made a request wait out the socket
    timeout twice (4 s, against the API's 2 s) before its 503.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable or refused (wrap in `redis_errors`).
    """
    if not keys:
        return []
    if isinstance(client, RedisCluster):
        by_slot: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            by_slot.setdefault(client.keyslot(key), []).append(position)
        if len(by_slot) > 1:
            return _mget_by_slot(client, keys, list(by_slot.values()))
    return client.mget(list(keys))


def execute_commands(client: Client, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Returns the replies of `commands` (each its arguments, as `execute_command` takes them),
    sent in one round trip without a transaction: one pipeline on one server; on a cluster, each
    master's commands on one connection of its own (`core.redis_masters`), so a hung master costs
    one socket timeout. redis-py's cluster pipeline re-sends, one by one, the commands of a node
    that timed out: the at-risk update with 6 commands on a hung master waited 35 s.

    The replies callers may use are those both paths give alike: integers, and the flat
    member, score, ... list of `ZREVRANGE ... WITHSCORES` (redis-py's response callbacks see no
    `withscores` option here).

    Raises:
        redis.exceptions.RedisError: Redis is unreachable or refused (wrap in `redis_errors`).
    """
    if not commands:
        return []
    if isinstance(client, RedisCluster):
        return execute_commands_by_master(client, commands)
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute()


def _mget_by_slot(cluster: RedisCluster, keys: Sequence[str | bytes], slots: list[list[int]]) -> list[Any]:
    """Returns the values of `keys`, read with one MGET per slot (`slots`: the positions of each
    slot's keys), each master's on one connection (`core.redis_masters`)."""
    mgets = [("MGET", *(keys[i] for i in positions)) for positions in slots]
    values: list[Any] = [None] * len(keys)
    for positions, found in zip(slots, execute_commands_by_master(cluster, mgets), strict=True):
        for position, value in zip(positions, found, strict=True):
            values[position] = value
    return values


# Errors that pass by themselves: Redis is starting (LOADING), busy with a script (BUSY), a
# cluster is moving slots or electing (TRYAGAIN, MASTERDOWN), or a slot is served elsewhere now
# (MOVED, ASK: a write sent by the project's own per-master writer, `features.redis_store`, after
# a failover or a resharding; it asks for the slot map again before raising). Retried quietly
# with backoff.
TRANSIENT: tuple[type[Exception], ...] = (
    *UNREACHABLE,
    BusyLoadingError,
    TryAgainError,
    MasterDownError,
    MovedError,
    AskError,
)
# Reply prefixes of transient refusals redis-py has no class for.
_TRANSIENT_CODES = frozenset({"BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "MOVED", "ASK"})


def classify(exc: Exception) -> str | None:
    """Returns None for an error that passes by itself (unreachable, timeout, LOADING, BUSY,
    TRYAGAIN), else the error code of a refusal that lasts until someone acts: `OOM`, `READONLY`,
    `MISCONF`, `AUTH` (NOAUTH / WRONGPASS), `NOPERM`, or the first word of any other refusal."""
    # redis-py strips the code from the message of the errors it has a class for: map them back.
    # Checked first: its authentication errors are ConnectionErrors.
    for kind, code in _REFUSALS:
        if isinstance(exc, kind):
            return code
    words = str(exc).split(maxsplit=1)
    code = words[0].upper() if words else ""
    if isinstance(exc, TRANSIENT) or code in _TRANSIENT_CODES:
        return None
    if isinstance(exc, RedisClusterException) and CLUSTER_UNREACHABLE in str(exc):
        return None
    if isinstance(exc, ResponseError):
        return code if code.isalpha() and code.isupper() else "ERR"
    return type(exc).__name__


_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (redis.exceptions.OutOfMemoryError, "OOM"),  # type: ignore[attr-defined]  # in redis-py, not in its stubs
    (ReadOnlyError, "READONLY"),
    (AuthenticationError, "AUTH"),
    (AuthorizationError, "AUTH"),
    (NoPermissionError, "NOPERM"),
)


@contextmanager
def redis_errors(action: str, where: str = "Redis") -> Iterator[None]:
    """Turns Redis errors raised inside the block into the project's errors, classified once
    here for every caller (scorer, API, commands), each saying `where` failed doing `action`.

    Raises:
        ServiceUnavailableError: Redis is unreachable or briefly unable (timeout, LOADING, BUSY):
            retry with backoff (HTTP 503).
        StoreRefusedError: Redis refused the command for a lasting reason (OOM, READONLY,
            MISCONF, NOAUTH/WRONGPASS: `AUTH`, ...): an operator must act; `reason` holds the code (HTTP 503).
    """
    try:
        yield
    except (redis.RedisError, RedisClusterException) as exc:
        reason = classify(exc)
        if reason is None:
            msg = f"{where} unavailable while {action}: {exc}"
            raise ServiceUnavailableError(msg) from exc
        msg = f"{where} refused {action} ({reason}): {exc}"
        raise StoreRefusedError(msg, reason) from exc
