"""Each user's latest risk as written by the scorer, readable by the API and dashboards."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import msgspec
from redis.cluster import RedisCluster

from core.redis import Client, mget, redis_errors, user_key, user_tag
from core.redis_masters import execute_commands_by_master


class RiskRow(msgspec.Struct, frozen=True):
    """The scorer's latest answer for one user.

    `event_time_ms` is the user's latest event (the score is as of it); `scored_at_ms` is the
    wall-clock time the row was written (the only field that differs between replays). A
    cancelled user's row has `cancelled_ms` (their cancellation's event time) and no
    probability or tier: they are no longer scored. `prediction_id` identifies the score
    (`models.runtime.prediction_id`; empty for a cancelled user).
    """

    user_id: str
    churn_probability: float | None
    risk_tier: str | None
    model_version: str
    event_time_ms: int
    scored_at_ms: int
    cancelled_ms: int | None = None
    prediction_id: str = ""

    @classmethod
    def cancelled(cls, user_id: str, cancelled_ms: int, event_time_ms: int, written_ms: int) -> RiskRow:
        """Returns the row that marks `user_id` as cancelled at `cancelled_ms`."""
        return cls(user_id, None, None, "", event_time_ms, written_ms, cancelled_ms)


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(RiskRow)


class RiskStore(Protocol):
    """Writes and reads the latest risk per user."""

    def write(self, rows: Sequence[RiskRow]) -> None:
        """Upserts the rows; raises ServiceUnavailableError."""
        ...

    def read(self, user_ids: Iterable[str]) -> list[RiskRow | None]:
        """Returns one row per id (None if never scored); raises ServiceUnavailableError."""
        ...

    def advance_watermark(self, event_ms: int) -> None:
        """Raises the stream's event-time watermark to `event_ms` (never lowers it)."""
        ...

    def watermark(self) -> int | None:
        """Returns the largest event time the scorers have processed, None before any."""
        ...


class InMemoryRiskStore:
    """A RiskStore in a dict, for unit tests."""

    def __init__(self) -> None:
        self.rows: dict[str, RiskRow] = {}
        self.latest_event_ms: int | None = None

    def write(self, rows: Sequence[RiskRow]) -> None:
        """Upserts the rows."""
        for row in rows:
            self.rows[row.user_id] = row

    def read(self, user_ids: Iterable[str]) -> list[RiskRow | None]:
        """Returns one row per id (None if never scored)."""
        return [self.rows.get(u) for u in user_ids]

    def advance_watermark(self, event_ms: int) -> None:
        """Raises the watermark to `event_ms` (never lowers it)."""
        self.latest_event_ms = max(self.latest_event_ms or event_ms, event_ms)

    def watermark(self) -> int | None:
        """Returns the largest event time processed, None before any."""
        return self.latest_event_ms


# Several scorers share one watermark: only ever raise it, atomically.
_RAISE_TO = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
"""


# Every row with its expiry in one command: KEYS are the rows' keys, ARGV the TTL in ms, then the rows.
_SET_WITH_TTL = """#!lua
local ttl = ARGV[1]
for j = 1, #KEYS do redis.call('SET', KEYS[j], ARGV[j + 1], 'PX', ttl) end
"""


class RedisRiskStore:
    """Risk rows as JSON values under `<prefix>risk:{<group>}<user_id>` (`core.redis.user_key`:
    in the slot of the user's state), expiring after `ttl_seconds` without a write (0: never); the
    watermark at `<prefix>watermark`. On a Redis Cluster the rows are written with one command
    per slot group, each master's on one connection."""

    def __init__(self, client: Client, prefix: str = "churn:", ttl_seconds: int = 0) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.prefix = f"{prefix}risk:"
        self.watermark_key = f"{prefix}watermark"
        self.ttl_ms = ttl_seconds * 1000
        # RedisCluster has `register_script` too (redis-py types it for Redis only).
        self._raise_to = client.register_script(_RAISE_TO)  # type: ignore[union-attr]
        self._set_with_ttl = client.register_script(_SET_WITH_TTL)  # type: ignore[union-attr]

    def write(self, rows: Sequence[RiskRow]) -> None:
        """Upserts the rows in one command (MSET, or a script setting each row with its TTL);
        raises ServiceUnavailableError (StoreRefusedError when Redis refuses)."""
        if not rows:
            return
        with redis_errors("writing risk rows"):
            if self.cluster:
                self._write_per_group(rows)
            elif self.ttl_ms:
                keys = [self.key(r.user_id) for r in rows]
                self._set_with_ttl(keys=keys, args=[self.ttl_ms, *map(_ENCODER.encode, rows)])
            else:
                self.client.mset({self.key(r.user_id): _ENCODER.encode(r) for r in rows})

    def key(self, user_id: str) -> str:
        """Returns the Redis key of `user_id`'s risk row."""
        return user_key(self.prefix, user_id)

    def _write_per_group(self, rows: Sequence[RiskRow]) -> None:
        """The write on a cluster: one MSET or TTL script per slot group, each master's on one
        connection (`core.redis_masters`: a hung master costs one socket timeout, not one per
        group)."""
        groups: dict[str, list[RiskRow]] = {}
        for row in rows:
            groups.setdefault(user_tag(row.user_id), []).append(row)
        assert isinstance(self.client, RedisCluster)
        writes: list[tuple[Any, ...]] = []
        for group in groups.values():
            keys = [self.key(r.user_id) for r in group]
            if self.ttl_ms:
                # EVAL, not EVALSHA: a replica promoted by a failover may not have the script cached.
                writes.append(("EVAL", _SET_WITH_TTL, len(keys), *keys, self.ttl_ms, *map(_ENCODER.encode, group)))
            else:
                pairs: list[Any] = [None] * (2 * len(keys))
                pairs[::2], pairs[1::2] = keys, map(_ENCODER.encode, group)
                writes.append(("MSET", *pairs))
        execute_commands_by_master(self.client, writes, key_at=3 if self.ttl_ms else 1)

    def read(self, user_ids: Iterable[str]) -> list[RiskRow | None]:
        """Returns one row per id (None if never scored); raises ServiceUnavailableError."""
        ids = list(user_ids)
        if not ids:
            return []
        with redis_errors("reading risk rows"):
            blobs = mget(self.client, [self.key(u) for u in ids])
        return self.decode(blobs)

    def read_command(self, user_ids: Sequence[str]) -> tuple[str | bytes, ...]:
        """Returns the Redis command `read` sends for `user_ids` (non-empty) on a single Redis, for
        a caller that pipelines it with other reads; `decode` turns its reply into the rows."""
        return ("MGET", *(self.key(u) for u in user_ids))

    @staticmethod
    def decode(blobs: Sequence[bytes | None]) -> list[RiskRow | None]:
        """Returns the rows of an MGET reply of risk keys (None where a key holds nothing)."""
        return [None if b is None else _DECODER.decode(b) for b in blobs]

    def advance_watermark(self, event_ms: int) -> None:
        """Raises the shared watermark to `event_ms`; raises ServiceUnavailableError."""
        with redis_errors("advancing the watermark"):
            self._raise_to(keys=[self.watermark_key], args=[event_ms])

    def watermark(self) -> int | None:
        """Returns the shared watermark, None before any batch; raises ServiceUnavailableError."""
        with redis_errors("reading the watermark"):
            value = self.client.get(self.watermark_key)
        return None if value is None else int(value)
