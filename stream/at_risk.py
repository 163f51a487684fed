"""The at-risk list: per risk tier, the scored users ranked by probability and by newest score,
maintained by the scorer as it writes risk rows, read by `GET /users/at-risk`.

Redis: per tier two sorted sets, `<prefix>atrisk:<tier>:probability` (score = churn
probability) and `<prefix>atrisk:<tier>:newest` (score = event time of the scored event). Each
is one key, so the structure works the same on Redis Cluster. A user is added to their tier's
sets and removed from the others' in one round trip per batch (ZADD and ZREM are idempotent: a
replayed batch writes the same members). The risk rows stay the truth: a reader joins the page
with them and drops members whose row expired or moved (`RiskRow` expiry is a key TTL, members
of a set cannot expire), pruning them from the set it paged: a member goes only if its score is
still the one the page saw, so a user the scorer re-added meanwhile (a new score) stays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from core.redis import Client, execute_commands, redis_errors
from stream.risk_store import RiskRow

TIERS = ("high", "medium", "low")
Order = Literal["probability", "newest"]
ORDERS: tuple[Order, ...] = ("probability", "newest")


def _rank_score(row: RiskRow, order: Order) -> float:
    return float(row.churn_probability or 0.0) if order == "probability" else float(row.event_time_ms)


class AtRiskIndex(Protocol):
    """Users per tier, ranked by probability and by newest score."""

    def update(self, rows: Sequence[RiskRow]) -> None:
        """Puts scored rows in their tier and takes cancelled ones out of every tier;
        raises ServiceUnavailableError."""
        ...

    def page(self, tier: str, order: Order, offset: int, limit: int) -> tuple[int, list[tuple[str, float]]]:
        """Returns (users in the tier, the (user id, score) ranked `offset`..`offset + limit - 1`
        in `order`, highest first, ties by user id descending); raises ServiceUnavailableError."""
        ...

    def prune(self, tier: str, order: Order, seen: Mapping[str, float]) -> int:
        """Takes the stale members a reader found out of the tier's `order` set, each only if
        its score is still the one in `seen` (else the scorer re-added it since); returns how
        many went. Raises ServiceUnavailableError."""
        ...


class InMemoryAtRiskIndex:
    """An AtRiskIndex in dicts (unit tests)."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, RiskRow]] = {tier: {} for tier in TIERS}

    def update(self, rows: Sequence[RiskRow]) -> None:
        """See `AtRiskIndex.update`."""
        for row in rows:
            for tier in TIERS:
                self.members[tier].pop(row.user_id, None)
            if row.risk_tier is not None and row.cancelled_ms is None:
                self.members[row.risk_tier][row.user_id] = row

    def page(self, tier: str, order: Order, offset: int, limit: int) -> tuple[int, list[tuple[str, float]]]:
        """See `AtRiskIndex.page`."""
        ranked = sorted(self.members[tier].values(), key=lambda r: (_rank_score(r, order), r.user_id), reverse=True)
        return len(ranked), [(r.user_id, _rank_score(r, order)) for r in ranked[offset : offset + limit]]

    def prune(self, tier: str, order: Order, seen: Mapping[str, float]) -> int:
        """See `AtRiskIndex.prune` (one set per tier here: both orders are pruned)."""
        members = self.members[tier]
        gone = [u for u, score in seen.items() if u in members and _rank_score(members[u], order) == score]
        for user in gone:
            del members[user]
        return len(gone)


class RedisAtRiskIndex:
    """The at-risk sorted sets in Redis (see the module doc)."""

    def __init__(self, client: Client, prefix: str = "churn:") -> None:
        self.client = client
        self.prefix = f"{prefix}atrisk:"
        # RedisCluster has `register_script` too (redis-py types it for Redis only).
        self._prune = client.register_script(_PRUNE_IF_UNCHANGED)  # type: ignore[union-attr]

    def key(self, tier: str, order: Order) -> str:
        """Returns the sorted set of one tier and order."""
        return f"{self.prefix}{tier}:{order}"

    def update(self, rows: Sequence[RiskRow]) -> None:
        """See `AtRiskIndex.update` (one round trip, no transaction: each command is idempotent)."""
        if not rows:
            return
        by_tier: dict[str, list[RiskRow]] = {tier: [] for tier in TIERS}
        cancelled: list[str] = []
        for row in rows:
            if row.risk_tier in by_tier and row.cancelled_ms is None:
                by_tier[row.risk_tier].append(row)
            else:
                cancelled.append(row.user_id)
        commands: list[tuple[str | float, ...]] = []
        for tier, members in by_tier.items():
            others = [r.user_id for t, rs in by_tier.items() if t != tier for r in rs] + cancelled
            for order in ORDERS:
                key = self.key(tier, order)
                if members:
                    commands.append(("ZADD", key, *(v for r in members for v in (_rank_score(r, order), r.user_id))))
                if others:
                    commands.append(("ZREM", key, *others))
        with redis_errors("updating the at-risk list"):
            execute_commands(self.client, commands)

    def page(self, tier: str, order: Order, offset: int, limit: int) -> tuple[int, list[tuple[str, float]]]:
        """See `AtRiskIndex.page` (ZCARD and ZREVRANGE WITHSCORES: O(log n + limit))."""
        key = self.key(tier, order)
        with redis_errors("reading the at-risk list"):
            total, flat = execute_commands(
                self.client, [("ZCARD", key), ("ZREVRANGE", key, offset, offset + limit - 1, "WITHSCORES")]
            )
        members = (m.decode() if isinstance(m, bytes) else m for m in flat[::2])
        return int(total), [(m, float(score)) for m, score in zip(members, flat[1::2], strict=True)]

    def prune(self, tier: str, order: Order, seen: Mapping[str, float]) -> int:
        """See `AtRiskIndex.prune`: one script on the one key (so it works on Redis Cluster),
        comparing each member's score with the one seen before removing it. The other order's
        set keeps its stale members until a reader pages that one."""
        if not seen:
            return 0
        args = [value for user, score in seen.items() for value in (user, repr(score))]
        with redis_errors("pruning the at-risk list"):
            return int(self._prune(keys=[self.key(tier, order)], args=args))


# ARGV: member, score seen, member, score seen, ...: ZREM each member whose score is unchanged.
_PRUNE_IF_UNCHANGED = """
local removed = 0
for i = 1, #ARGV, 2 do
    local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if score and tonumber(score) == tonumber(ARGV[i + 1]) then
        removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
    end
end
return removed
"""
