"""`churn bench at-risk` on a small population: the real server starts, answers full pages in
both orders, and every figure the report promises is there; the scratch prefix is gone after."""

from __future__ import annotations

import pytest

from bench.at_risk import bench_at_risk
from core.redis import redis_client
from core.settings import Settings


@pytest.mark.soak  # a server start and 160 requests: ~40 s
@pytest.mark.slow
def test_the_at_risk_bench_times_the_real_route_its_floor_and_the_stores(settings: Settings) -> None:
    progress: list[str] = []
    figures = bench_at_risk(settings, users=3000, requests=40, limit=50, say=progress.append)

    assert figures["machine"]["cpu_model"]
    assert figures["high_tier_users"] > figures["limit"]  # full pages were asked for, and checked
    for part in ("probability", "newest", "health_live_floor", "stores_only_probability"):
        latency = figures[part]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"], part
    # The route does what the stores-only page does, and more (HTTP, the app), and more than the floor.
    assert figures["probability"]["p50_ms"] > figures["stores_only_probability"]["p50_ms"]
    assert figures["probability"]["p50_ms"] > figures["health_live_floor"]["p50_ms"]
    assert any("churn serve" in line for line in progress)
    client = redis_client(settings)
    try:
        assert not list(client.scan_iter(f"{figures['redis_prefix']}*", count=1000))
    finally:
        client.close()
