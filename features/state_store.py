"""Where the scorer keeps each user's engine state (and so its last applied offsets) between runs.

Redis in production (one msgpack value per user), a dict in unit tests. Saving the state
after the features are written is what makes replays after a crash recognisable.

Besides the states, the store keeps the scorer's applied offsets: per Kafka partition
(`"<topic>:<partition>"`), the next offset to read once the saved states hold every event
before it. They are written with the states in one atomic step that first checks Redis still
holds what this process last wrote: a Redis restarted from older files (its append-only file
loses up to the last second) is refused with `StateRolledBackError`, and the scorer replays
from the offsets Redis does hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from redis.cluster import RedisCluster

from core.redis import Client, group_tags, mget, redis_errors, user_key, user_tag
from core.redis_masters import execute_commands_by_master
from features.online import STATE_DECODER, UserState

# No applied offset stored for a partition.
NOTHING_APPLIED = -1


class StateRolledBackError(Exception):
    """The store holds older applied offsets than expected: it went back in time (a Redis that
    restarted from older files, or lost them). `behind` maps each such partition to the offset
    the store does hold (`NOTHING_APPLIED` if none); nothing of the refused save was written."""

    def __init__(self, behind: Mapping[str, int]) -> None:
        super().__init__(f"applied offsets went back in time: {dict(behind)}")
        self.behind = dict(behind)


class StateStore(Protocol):
    """Loads and saves per-user engine states and the applied offsets they account for."""

    def load(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """Returns the saved states of the users that have one; raises ServiceUnavailableError."""
        ...

    def save(self, blobs: Mapping[str, bytes], applied: Mapping[str, int], expected: Mapping[str, int]) -> int:
        """Saves states encoded with `STATE_ENCODER` (the caller encodes: the scorer does it
        right after each user's update) and then the `applied` offsets, all or nothing, if the
        stored applied offset of every partition in `expected` is at least the expected one.
        Returns the bytes written.

        Raises:
            StateRolledBackError: a stored applied offset is below its expected value.
            ServiceUnavailableError: the store is down or refused the write.
        """
        ...

    def applied(self, partitions: Iterable[str]) -> dict[str, int]:
        """Returns the stored applied offset of each partition (`NOTHING_APPLIED` if none);
        raises ServiceUnavailableError."""
        ...


class InMemoryStateStore:
    """A StateStore in a dict (serialised, so tests see exactly what Redis would hold)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.offsets: dict[str, int] = {}

    def load(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """Returns the saved states of the users that have one."""
        return {u: STATE_DECODER.decode(self.blobs[u]) for u in user_ids if u in self.blobs}

    def save(self, blobs: Mapping[str, bytes], applied: Mapping[str, int], expected: Mapping[str, int]) -> int:
        """Saves encoded states and applied offsets; returns the bytes written.

        Raises:
            StateRolledBackError: a stored applied offset is below its expected value.
        """
        behind = {p: self.offsets.get(p, NOTHING_APPLIED) for p, want in expected.items()}
        behind = {p: have for p, have in behind.items() if have < expected[p]}
        if behind:
            raise StateRolledBackError(behind)
        self.blobs.update(blobs)
        self.offsets.update(applied)
        return sum(map(len, blobs.values()))

    def applied(self, partitions: Iterable[str]) -> dict[str, int]:
        """Returns the stored applied offset of each partition (`NOTHING_APPLIED` if none)."""
        return {p: self.offsets.get(p, NOTHING_APPLIED) for p in partitions}


# KEYS: the applied-offsets hash, then the state keys. ARGV: TTL in ms (0: none), n partitions,
# their n fields, n expected offsets, n new offsets, then one blob per state key. With a
# shebang, Redis refuses the whole script up front when it is out of memory (no partial write).
_SAVE = """#!lua
local n = tonumber(ARGV[2])
local behind = {}
for i = 1, n do
  local have = tonumber(redis.call('HGET', KEYS[1], ARGV[2 + i]) or '-1')
  if have < tonumber(ARGV[2 + n + i]) then
    behind[#behind + 1] = ARGV[2 + i]
    behind[#behind + 1] = tostring(have)
  end
end
if #behind > 0 then return behind end
local ttl = tonumber(ARGV[1])
local base = 2 + 3 * n - 1
for j = 2, #KEYS do
  if ttl > 0 then
    redis.call('SET', KEYS[j], ARGV[base + j], 'PX', ttl)
  else
    redis.call('SET', KEYS[j], ARGV[base + j])
  end
end
for i = 1, n do redis.call('HSET', KEYS[1], ARGV[2 + i], ARGV[2 + 2 * n + i]) end
return behind
"""


class RedisStateStore:
    """States as `<prefix>state:<layout>:{<group>}<user_id>` msgpack values (`core.redis.user_key`),
    read with MGET; applied offsets in the hash `<prefix>applied:<layout>`; both written by one
    script (atomic, and one unit in the append-only file). `layout` is the engine's
    `state_layout` (states of another layout are not read). States expire after `ttl_seconds`
    without a write (0: never).

    On a Redis Cluster a script's keys must share a slot, so the applied offsets are kept once
    per slot group (`<prefix>applied:<layout>{<group>}`, beside that group's states), every save
    runs one script per group (each master's on one connection) writing the group's states and the same
    offsets into its hash, and the offsets Redis holds are the lowest over the groups. A master
    that lost its latest writes in a failover (replication is asynchronous) holds older offsets
    in its groups: that is seen as going back in time, as on one server. A group's save is
    atomic; when some groups refuse (`StateRolledBackError`) the others keep the batch, which
    the replay then finds applied in their users' states."""

    def __init__(self, client: Client, prefix: str, layout: str, ttl_seconds: int = 0) -> None:
        self.client = client
        self.prefix = f"{prefix}state:{layout}:"
        self.applied_key = f"{prefix}applied:{layout}"
        self.cluster = isinstance(client, RedisCluster)
        self.applied_keys = [self.applied_key + tag for tag in group_tags()] if self.cluster else [self.applied_key]
        self.ttl_ms = ttl_seconds * 1000
        self._save = client.register_script(_SAVE)  # type: ignore[union-attr]  # RedisCluster has it too

    def key(self, user_id: str) -> str:
        """Returns the Redis key of `user_id`'s state."""
        return user_key(self.prefix, user_id)

    def load(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """Returns the saved states of the users that have one; raises ServiceUnavailableError."""
        ids = list(user_ids)
        if not ids:
            return {}
        with redis_errors("loading user states"):
            blobs = mget(self.client, [self.key(u) for u in ids])
        return {u: STATE_DECODER.decode(b) for u, b in zip(ids, blobs, strict=True) if b is not None}

    def save(self, blobs: Mapping[str, bytes], applied: Mapping[str, int], expected: Mapping[str, int]) -> int:
        """Saves the states, then the applied offsets, in one atomic script that first checks the
        expected offsets; returns the bytes written.

        Raises:
            StateRolledBackError: a stored applied offset is below its expected value.
            ServiceUnavailableError: Redis is unreachable; StoreRefusedError: it refused (OOM...).
        """
        if not blobs and not applied:
            return 0
        fields = list(applied)
        head: list[Any] = [self.ttl_ms, len(fields), *fields]
        head += [expected.get(p, NOTHING_APPLIED) for p in fields]
        head += [applied[p] for p in fields]
        with redis_errors("saving user states"):
            if not self.cluster:
                replies = [self._save(keys=[self.applied_key, *map(self.key, blobs)], args=[*head, *blobs.values()])]
            else:
                replies = self._save_per_group(blobs, head, bool(fields))
        behind: dict[str, int] = {}
        for reply in replies:
            for i in range(0, len(reply), 2):
                partition, have = reply[i].decode(), int(reply[i + 1])
                behind[partition] = min(have, behind.get(partition, have))
        if behind:
            raise StateRolledBackError(behind)
        return sum(map(len, blobs.values()))

    def _save_per_group(self, blobs: Mapping[str, bytes], head: list[Any], every_group: bool) -> list[Any]:
        """Runs the save script once per slot group (every group when offsets are saved: each
        keeps its copy), each master's on one connection (`core.redis_masters`: a hung master
        costs one socket timeout, not one per group); returns the replies. Raises redis errors."""
        groups: dict[str, list[str]] = {tag: [] for tag in group_tags()} if every_group else {}
        for user in blobs:
            groups.setdefault(user_tag(user), []).append(user)
        assert isinstance(self.client, RedisCluster)
        scripts = []
        for tag, users in groups.items():
            keys = [self.applied_key + tag, *map(self.key, users)]
            # EVAL, not EVALSHA: a replica promoted by a failover may not have the script cached.
            scripts.append(("EVAL", _SAVE, len(keys), *keys, *head, *(blobs[u] for u in users)))
        return execute_commands_by_master(self.client, scripts, key_at=3)

    def applied(self, partitions: Iterable[str]) -> dict[str, int]:
        """Returns the stored applied offset of each partition (`NOTHING_APPLIED` if none);
        raises ServiceUnavailableError."""
        fields = list(partitions)
        if not fields:
            return {}
        replies: list[Any]
        with redis_errors("reading the applied offsets"):
            if not self.cluster:
                replies = [self.client.hmget(self.applied_key, fields)]
            else:
                assert isinstance(self.client, RedisCluster)
                replies = execute_commands_by_master(
                    self.client, [("HMGET", key, *fields) for key in self.applied_keys]
                )
        return {
            p: min(NOTHING_APPLIED if reply[i] is None else int(reply[i]) for reply in replies)
            for i, p in enumerate(fields)
        }


def remove_old_layouts(client: Client, prefix: str, layout: str, batch: int = 5000) -> int:
    """Deletes the states and applied offsets under `prefix` of every state layout but `layout`
    (left by an older spec or lateness: never read again); returns how many keys were deleted.

    Raises:
        ServiceUnavailableError: Redis is unreachable or refused.
    """
    keep = (f"{prefix}state:{layout}:".encode(), f"{prefix}applied:{layout}".encode())
    deleted = 0
    doomed: list[bytes] = []
    with redis_errors("removing old state layouts"):
        for pattern in (f"{prefix}state:*", f"{prefix}applied:*"):
            for key in client.scan_iter(pattern, count=batch):
                # On a cluster the applied offsets are one hash per slot group: `<key>{<group>}`.
                if not key.startswith(keep[0]) and key != keep[1] and not key.startswith(keep[1] + b"{"):
                    doomed.append(key)
                if len(doomed) >= batch:
                    deleted += int(client.unlink(*doomed))
                    doomed.clear()
        if doomed:
            deleted += int(client.unlink(*doomed))
    return deleted
