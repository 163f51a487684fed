"""`churn bench at-risk`: `GET /users/at-risk` with `users` scored users in Redis.

A throwaway Redis prefix gets `users` risk rows (probabilities uniform, tiers 10% high, 20%
medium, 70% low) written through the scorer's stores (`RedisRiskStore`, `RedisAtRiskIndex`),
then the route is called in-process through the real app (FastAPI's TestClient: routing,
validation, the sorted-set page, the join with the risk rows, serialisation; no network) for
`requests` pages at `limit`, by probability and by newest, on the first ten pages; and the
same pages read from the stores alone (`at_risk_page`: ZCARD + ZREVRANGE, MGET of the rows),
which tells the Redis part from the app's. The prefix is deleted afterwards. Closed loop, one
caller: the figures are the route's own latency.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

from fastapi.testclient import TestClient

from bench.harness import delete_prefix
from bench.loadgen import percentiles_ms
from core.redis import redis_client
from core.settings import Settings
from features.store import InMemoryFeatureStore
from models.holder import ModelHolder
from monitoring.metrics import Metrics
from serving.app import create_app
from serving.deps import Deps
from serving.risk import RiskService, at_risk_page
from stream.at_risk import RedisAtRiskIndex
from stream.risk_store import RedisRiskStore, RiskRow

START_MS = 1_767_225_600_000


def load_users(risks: RedisRiskStore, index: RedisAtRiskIndex, users: int, chunk: int = 10_000) -> float:
    """Writes `users` scored rows through the scorer's stores; returns the seconds it took."""
    rng = random.Random(0)  # noqa: S311 (synthetic scores)
    started = time.perf_counter()
    for start in range(0, users, chunk):
        rows = []
        for i in range(start, min(users, start + chunk)):
            p = rng.random()
            tier = "high" if p >= 0.9 else "medium" if p >= 0.7 else "low"
            at = START_MS + rng.randint(0, 28 * 86_400_000)
            rows.append(RiskRow(f"user{i}", p, tier, "1", at, at, None, uuid.uuid4().hex[:24]))
        risks.write(rows)
        index.update(rows)
    return time.perf_counter() - started


def bench_at_risk(settings: Settings, users: int, requests: int, limit: int) -> dict[str, Any]:
    """Returns the route's latency percentiles per order, with the load figures."""
    prefix = f"bench:atrisk:{uuid.uuid4().hex[:8]}:"
    client = redis_client(settings, "request")
    risks, index = RedisRiskStore(client, prefix), RedisAtRiskIndex(client, prefix)
    try:
        load_seconds = load_users(risks, index, users)
        memory = int(client.info("memory")["used_memory"])
        deps = Deps(
            service=RiskService(InMemoryFeatureStore(), risks, lambda: None, lambda: None, Metrics()),
            models=ModelHolder(lambda: None, lambda: None),
            metrics=Metrics(),
            at_risk=index,
        )
        figures: dict[str, Any] = {"users": users, "limit": limit, "requests_per_order": requests}
        with TestClient(create_app(settings.model_copy(update={"api_keys": []}), deps)) as api:
            for order in ("probability", "newest"):
                latencies = []
                for i in range(requests + 50):
                    offset = (i % 10) * limit
                    sent = time.perf_counter()
                    answer = api.get(f"/users/at-risk?tier=high&order={order}&limit={limit}&offset={offset}")
                    took = time.perf_counter() - sent
                    if answer.status_code != 200 or len(answer.json()["users"]) != limit:
                        msg = f"unexpected answer {answer.status_code}: {answer.text[:200]}"
                        raise RuntimeError(msg)
                    if i >= 50:  # warm-up
                        latencies.append(took)
                figures[order] = percentiles_ms(latencies)
            stores = []
            for i in range(requests):
                sent = time.perf_counter()
                at_risk_page(index, risks, "high", "probability", (i % 10) * limit, limit)
                stores.append(time.perf_counter() - sent)
            figures["stores_only_probability"] = percentiles_ms(stores)
        figures["load_seconds"] = round(load_seconds, 1)
        figures["redis_used_memory_bytes"] = memory
        figures["high_tier_users"] = index.page("high", "probability", 0, 1)[0]
        return figures
    finally:
        client.close()
        delete_prefix(settings, prefix)
