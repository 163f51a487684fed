"""The at-risk list: per risk tier, the scored users ranked by probability and by newest score,
maintained by the scorer as it writes risk rows, read by `GET /users/at-risk`.

Redis: per tier two sorted sets, `<prefix>atrisk:<tier>:probability` (score = churn
probability) and `<prefix>atrisk:<tier>:newest` (score = event time of the scored event). Each
is one key, so the structure works the same on Redis Cluster. A user is added to their tier's
sets and removed from the others' in one pipeline per batch (ZADD and ZREM are idempotent: a
replayed batch writes the same members). The risk rows stay the truth: a reader joins the page
with them and drops members whose row expired or moved (`RiskRow` expiry is a key TTL, members
of a set cannot expire), removing them from the set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from core.redis import Client, redis_errors
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

    def page(self, tier: str, order: Order, offset: int, limit: int) -> tuple[int, list[str]]:
        """Returns (users in the tier, the user ids ranked `offset`..`offset + limit - 1`, highest
        first, ties by user id descending); raises ServiceUnavailableError."""
        ...

    def remove(self, tier: str, user_ids: Sequence[str]) -> None:
        """Takes users out of a tier (stale members found by a reader); raises ServiceUnavailableError."""
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

    def page(self, tier: str, order: Order, offset: int, limit: int) -> tuple[int, list[str]]:
        """See `AtRiskIndex.page`."""
        ranked = sorted(self.members[tier].values(), key=lambda r: (_rank_score(r, order), r.user_id), reverse=True)
        return len(ranked), [r.user_id for r in ranked[offset : offset + limit]]

    def remove(self, tier: str, user_ids: Sequence[str]) -> None:
        """See `AtRiskIndex.remove`."""
        for user in user_ids:
            self.members[tier].pop(user, None)


class RedisAtRiskIndex:
    """The at-risk sorted sets in Redis (see the module doc)."""

    def __init__(self, client: Client, prefix: str = "churn:") -> None:
        self.client = client
        self.prefix = f"{prefix}atrisk:"

    def key(self, tier: str, order: Order) -> str:
        """Returns the sorted set of one tier and order."""
        return f"{self.prefix}{tier}:{order}"

    def update(self, rows: Sequence[RiskRow]) -> None:
        """See `AtRiskIndex.update` (one pipeline, no transaction: each command is idempotent)."""
        if not rows:
            return
        by_tier: dict[str, list[RiskRow]] = {tier: [] for tier in TIERS}
        cancelled: list[str] = []
        for row in rows:
            if row.risk_tier in by_tier and row.cancelled_ms is None:
                by_tier[row.risk_tier].append(row)
            else:
                cancelled.append(row.user_id)
        with redis_errors("updating the at-risk list"):
            pipe = self.client.pipeline(transaction=False)
            for tier, members in by_tier.items():
                others = [r.user_id for t, rs in by_tier.items() if t != tier for r in rs] + cancelled
                for order in ORDERS:
                    if members:
                        pipe.zadd(self.key(tier, order), {r.user_id: _rank_score(r, order) for r in members})
                    if others:
                        pipe.zrem(self.key(tier, order), *others)
            pipe.execute()

    def page(self, tier: str, order: Order, offset: int, limit: int) -> tuple[int, list[str]]:
        """See `AtRiskIndex.page` (ZCARD and ZREVRANGE: O(log n + limit))."""
        key = self.key(tier, order)
        with redis_errors("reading the at-risk list"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zcard(key)
            pipe.zrevrange(key, offset, offset + limit - 1)
            total, members = pipe.execute()
        return int(total), [m.decode() if isinstance(m, bytes) else m for m in members]

    def remove(self, tier: str, user_ids: Sequence[str]) -> None:
        """See `AtRiskIndex.remove`."""
        if not user_ids:
            return
        with redis_errors("pruning the at-risk list"):
            pipe = self.client.pipeline(transaction=False)
            for order in ORDERS:
                pipe.zrem(self.key(tier, order), *user_ids)
            pipe.execute()
