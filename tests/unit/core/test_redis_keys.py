"""Key naming for Redis Cluster: one user's keys share a slot, the slot groups cover the slots evenly."""

from __future__ import annotations

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from core.redis import SLOT_GROUPS, group_tags, user_key, user_tag
from features.state_store import RedisStateStore
from stream.risk_store import RedisRiskStore


def test_one_users_keys_share_a_slot() -> None:
    client = redis.Redis()  # no I/O: only the key names are used
    states, risks = RedisStateStore(client, "churn:", "L1"), RedisRiskStore(client, "churn:")
    for user in ("1042", "u0", "a.b@c:d-e_f", "x" * 64):
        slot = key_slot(states.key(user).encode())
        assert key_slot(risks.key(user).encode()) == slot
        assert states.key(user).endswith(user_tag(user) + user)
        # The user's applied-offset copy on a cluster is its group's hash, in the same slot.
        assert key_slot((states.applied_key + user_tag(user)).encode()) == slot


def test_slot_groups_spread_evenly_over_the_slots() -> None:
    tags = group_tags()
    width = REDIS_CLUSTER_HASH_SLOTS // SLOT_GROUPS
    assert len(set(tags)) == SLOT_GROUPS
    assert [key_slot(f"k{tag}".encode()) // width for tag in tags] == list(range(SLOT_GROUPS))


def test_users_spread_over_the_groups() -> None:
    counts: dict[str, int] = {}
    for i in range(64_000):
        tag = user_tag(str(i))
        counts[tag] = counts.get(tag, 0) + 1
    assert len(counts) == SLOT_GROUPS
    assert max(counts.values()) < 1.15 * 1000  # 1,000 per group expected; CRC-32 is even
    assert user_key("p:", "42") == f"p:{user_tag('42')}42"
