"""`churn bench at-risk`: `GET /users/at-risk` with `users` scored users in Redis.

A throwaway Redis prefix gets `users` risk rows (probabilities uniform, tiers 10% high, 20%
medium, 70% low) written through the scorer's stores (`RedisRiskStore`, `RedisAtRiskIndex`).
Then a real `churn serve` (one uvicorn worker, as a user starts it) is asked, over one kept-alive
HTTP connection, for `requests` pages at `limit`, by probability and by newest, on the first ten
pages (fewer if the tier is small); and for `/health/live` as often, the server's own floor (HTTP
parsing, middleware, no Redis). The same pages are also read from the stores alone, in this
process (`at_risk_page`: ZCARD + ZREVRANGE, MGET of the rows, the answer built), which tells the
Redis part from the web part. Closed loop, one caller: the figures are the route's own latency.
The prefix, the Feast project the server needs to start and the scratch folder are deleted
afterwards.

An earlier version called the app in-process through FastAPI's TestClient, whose thread hops
cost 3.4 ms per request on their own (`/health/live`: 3.4 ms that way, 0.6 ms over HTTP to the
real server): it measured the test client more than the route.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.api import cpu_model, open_api_env, running, wait_ready
from bench.harness import CHURN, delete_prefix, free_port
from bench.loadgen import percentiles_ms
from core.redis import redis_client
from core.settings import Settings
from features.feast_repo import apply_repo
from serving.risk import at_risk_page
from stream.at_risk import RedisAtRiskIndex
from stream.risk_store import RedisRiskStore, RiskRow

START_MS = 1_767_225_600_000
WARMUP_REQUESTS = 50


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


def _timed_gets(port: int, paths: Sequence[str], requests: int, check: Callable[[bytes], None]) -> list[float]:
    """Returns the seconds of `requests` GETs of `paths` in turn on one kept-alive connection, after
    `WARMUP_REQUESTS` untimed ones; `check` sees each body after its clock stopped.

    Raises:
        RuntimeError: an answer was not 200 (with its body), or `check` raised.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    seconds = []
    try:
        for i in range(WARMUP_REQUESTS + requests):
            path = paths[i % len(paths)]
            sent = time.perf_counter()
            connection.request("GET", path)
            answer = connection.getresponse()
            body = answer.read()
            took = time.perf_counter() - sent
            if answer.status != 200:
                msg = f"GET {path}: {answer.status} {body[:200]!r}"
                raise RuntimeError(msg)
            check(body)
            if i >= WARMUP_REQUESTS:
                seconds.append(took)
    finally:
        connection.close()
    return seconds


def bench_at_risk(
    settings: Settings, users: int, requests: int, limit: int, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Returns the route's latency percentiles per order through a real `churn serve`, the
    server's `/health/live` floor, the stores-only page, the machine and the load figures. `say`
    gets one line per step (progress, for stderr).

    Raises:
        ServiceUnavailableError: Redis cannot be reached, or the server did not start.
        RuntimeError: the server answered a page with an error or the wrong number of users.
    """
    name = uuid.uuid4().hex[:8]
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="churn-at-risk-bench-", dir=settings.state_dir.resolve()))
    scratch = settings.model_copy(
        update={
            "state_dir": folder / "state",
            "feast_project": f"bench_atrisk_{name}",
            "feast_repo": folder / "feast",
            "redis_prefix": f"bench:atrisk{name}:",
        }
    )
    client = redis_client(scratch, "request")
    risks, index = RedisRiskStore(client, scratch.redis_prefix), RedisAtRiskIndex(client, scratch.redis_prefix)
    feast = None
    try:
        say(f"writing {users:,} scored users")
        load_seconds = load_users(risks, index, users)
        figures: dict[str, Any] = {
            "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
            "users": users,
            "redis_prefix": scratch.redis_prefix,  # deleted on the way out
            "limit": limit,
            "requests_per_order": requests,
            "load_seconds": round(load_seconds, 1),
            "redis_used_memory_bytes": int(client.info("memory")["used_memory"]),
            "high_tier_users": index.page("high", "probability", 0, 1)[0],
        }
        feast = apply_repo(scratch)  # `churn serve` starts only on an applied Feast repo
        port = free_port()
        env = open_api_env(scratch, port)

        # The first ten pages, or as many full pages as the high tier has (small runs).
        pages = max(1, min(10, figures["high_tier_users"] // limit))

        def full_page(body: bytes) -> None:
            got = len(json.loads(body)["users"])
            if got != min(limit, figures["high_tier_users"]):
                msg = f"a page of {got} users, not {limit}"
                raise RuntimeError(msg)

        say("starting churn serve")
        with running([CHURN, "serve"], env, folder / "serve.log") as server:
            wait_ready(port, server, folder / "serve.log", path="/health/live")
            for order in ("probability", "newest"):
                say(f"GET /users/at-risk?order={order}: {requests} requests")
                page = f"/users/at-risk?tier=high&order={order}&limit={limit}&offset="
                paths = [f"{page}{i * limit}" for i in range(pages)]
                seconds = _timed_gets(port, paths, requests, full_page)
                figures[order] = percentiles_ms(seconds)
            say(f"GET /health/live: {requests} requests")
            floor = _timed_gets(port, ["/health/live"], requests, lambda _: None)
            figures["health_live_floor"] = percentiles_ms(floor)
        stores = []
        for i in range(requests):
            sent = time.perf_counter()
            at_risk_page(index, risks, "high", "probability", (i % pages) * limit, limit)
            stores.append(time.perf_counter() - sent)
        figures["stores_only_probability"] = percentiles_ms(stores)
        figures["machine"]["load_average_1m_after"] = os.getloadavg()[0]
        return figures
    finally:
        client.close()
        if feast is not None:
            feast.teardown()
        delete_prefix(scratch, scratch.redis_prefix)
        shutil.rmtree(folder, ignore_errors=True)
