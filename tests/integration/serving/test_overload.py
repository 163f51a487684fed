"""`churn serve` (real uvicorn, one worker, default settings) on the real Redis at 3x its capacity.

Capacity is measured here, in the test, as `churn bench api` measures it: the highest open-loop
rate at which 99% of the requests are answered 200 within the latency budget, a refusal counting
as a late request (a failing step runs twice). With "every request answered 200", a search could
stop at a third of the server's capacity on 3 refusals in a stall, and "3x" then shed almost
nothing. The machine is shared and its speed varies, so every assertion compares figures of
this run with each other. At 3x that rate for 20 s the accepted requests must stay about as fast
as at capacity (p99 at most 2x; without shedding, every one of the 128 connections would wait in
the worker's queue: 128 service times, tens of times the bound), every other answer must be a 503
with `Retry-After`, and once the load drops the latency must be back to normal within 5 s (p90
within 2x of the calm p90 before the overload, p99 within 2x of the p99 at capacity; at most 1%
shed, as a stall can line up four requests at half capacity).

The p99 at capacity is the mean of two 10 s runs at capacity, one before the overload and one
after it, as the overload's 20 s. At capacity every stall of the shared machine delays all the
requests queued behind it, so one 10 s window's p99 depends on how many stalls it caught: 3.3 to
11.9 ms on the same server in one session, and one CI run failed on a calm window (3.3 ms, the
overload's 7.0 ms). Two windows on both sides of the overload halve that variance and cancel a
drift of the machine's speed during the test.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.api import MODES, START_MS, LoadPlan, _rows, find_capacity, load, wait_ready
from bench.harness import CHURN, free_port, scratch_settings
from core.settings import Settings
from features.feast_repo import apply_repo
from features.feast_store import FeastFeatureStore
from stream.risk_store import RedisRiskStore
from tests.support import record_figures, register_champion

USERS = 2000
OVERLOAD_SECONDS = 20.0
BACK_TO_NORMAL_SECONDS = 5.0
CONNECTIONS = 128
# What is kept of a run's figures; the latency from the actual send (`ok_service_latency`) says how
# much of the latency was the load generator's own lateness.
KEPT_FIGURES = ("achieved_rate", "statuses", "latency", "ok_latency", "ok_service_latency")


@pytest.mark.soak
def test_at_three_times_capacity_accepted_requests_stay_fast_and_the_rest_are_shed(
    settings: Settings, tmp_path: Path, unique: str
) -> None:
    uri = register_champion(tmp_path / "champion", settings)
    port = free_port()
    scratch, env = scratch_settings(
        settings,
        state_dir=tmp_path / "state",
        feast_project=f"overload{unique}",
        feast_repo=tmp_path / "feast",
        mlflow_tracking_uri=uri,
        redis_prefix=f"test:overload{unique}:",
        api_port=port,
        clock="event",
    )
    env |= {"CHURN_API_KEYS": "[]", "CHURN_API_OPEN": "true"}
    feast = apply_repo(scratch)
    FeastFeatureStore(feast).write_rows(_rows(USERS))
    client = redis.Redis.from_url(scratch.redis_address)
    RedisRiskStore(client, scratch.redis_prefix).advance_watermark(START_MS + 31 * 86_400_000)
    mode = MODES["score"]

    def run(rate: float, seconds: float, warmup: float = 0.5) -> dict[str, Any]:
        return load(port, USERS, mode, rate, seconds, CONNECTIONS, warmup, settings.api_latency_budget_ms)

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([CHURN, "serve", "--workers", "1"], env=env, stdout=out, stderr=out)
    try:
        wait_ready(port, server, log, timeout_s=180)
        # Warm: the first requests import and compile. 10 s, not 2: one CI run's search began while the
        # server (or the machine) was still slow, failed at 200/s and 100/s (p99 34 and 11 ms), then
        # passed 50-94/s with p99 4-8 ms, so "3x capacity" was 281/s and nothing was shed.
        run(100, 10.0)
        plan = LoadPlan(budget_ms=settings.api_latency_budget_ms, connections=CONNECTIONS, start_rate=200.0)
        found = find_capacity(lambda rate: run(rate, plan.step_seconds), plan)
        capacity, search = found["capacity_per_second"], found["search"]
        assert capacity > 0, search
        calm_before = run(capacity / 2, 5.0)
        at_capacity = run(capacity, 10.0)  # as long as `churn bench api` measures it: a steadier p99
        overload = run(3 * capacity, OVERLOAD_SECONDS)
        # The overload's sending stopped `drain_seconds` before it returned; measure from 5 s after that.
        dropped_at = time.monotonic() - overload["drain_seconds"]
        warmup = max(0.0, BACK_TO_NORMAL_SECONDS - (time.monotonic() - dropped_at))
        calm_after = run(capacity / 2, 5.0, warmup=warmup)
        at_capacity_after = run(capacity, 10.0)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(30)
        feast.teardown()
        for key in client.scan_iter(f"{scratch.redis_prefix}*"):
            client.delete(key)
        client.close()

    p99_at_capacity = round((at_capacity["ok_latency"]["p99_ms"] + at_capacity_after["ok_latency"]["p99_ms"]) / 2, 3)
    figures = {
        "capacity_per_second": capacity,
        "search": search,
        "max_in_flight": settings.api_max_in_flight,
        "calm_before_latency_ms": calm_before["latency"],
        "at_capacity": {k: at_capacity[k] for k in KEPT_FIGURES},
        "at_capacity_after": {k: at_capacity_after[k] for k in KEPT_FIGURES},
        "p99_at_capacity_ms": p99_at_capacity,
        "overload": {k: overload[k] for k in ("target_rate", "errors", "drain_seconds", *KEPT_FIGURES)},
        "overload_unavailable_without_retry_after": overload["unavailable_without_retry_after"],
        "calm_after_warmup_seconds": round(warmup, 2),
        "calm_after_latency_ms": calm_after["latency"],
    }
    record_figures(settings, "api_overload", figures)
    server_log = log.read_text(errors="replace")

    assert alive
    assert "ERROR" not in server_log, server_log[-3000:]
    assert "Traceback" not in server_log, server_log[-3000:]
    # At capacity: answered or shed, nothing else (the shared machine's speed drifts between runs,
    # so how much of it is shed is not asserted).
    for run_at_capacity in (at_capacity, at_capacity_after):
        assert set(run_at_capacity["statuses"]) <= {"200", "503"}, run_at_capacity["statuses"]
    # Overloaded: accepted requests stay about as fast as at capacity, the rest are refused at once
    # with Retry-After, nothing else fails, and the worker still completes most of its capacity.
    statuses = overload["statuses"]
    assert set(statuses) <= {"200", "503"}, statuses
    assert statuses.get("503", 0) > 0, statuses
    assert overload["unavailable_without_retry_after"] == 0
    assert overload["errors"] == 0, overload["first_errors"]
    assert overload["ok_latency"]["p99_ms"] <= 2 * p99_at_capacity, figures
    assert statuses["200"] / overload["seconds"] >= 0.5 * capacity, figures
    # Back to normal within 5 s of the drop: (nearly) every request answered, as fast as before.
    # At half capacity four requests are rarely in flight at once, but a stall of the shared
    # machine can line them up: one CI run shed 1 of 1,147. A worker still draining the overload
    # would shed most of them.
    assert set(calm_after["statuses"]) <= {"200", "503"}, calm_after["statuses"]
    assert calm_after["statuses"].get("503", 0) <= 0.01 * calm_after["requests"], calm_after["statuses"]
    assert calm_after["errors"] == 0
    # The bulk as fast as before the overload, the tail no slower than at capacity. Not the calm
    # windows' p99s against each other: 5 s at half capacity hold ~1,000 requests, so a p99 is
    # the 10th slowest and one stall moves it (one CI run: 8.2 ms after, 3.9 ms before, p90 2.0
    # and 1.8 ms). A worker still draining the overload would hold most requests far longer.
    assert calm_after["latency"]["p90_ms"] <= 2 * calm_before["latency"]["p90_ms"], figures
    assert calm_after["latency"]["p99_ms"] <= 2 * p99_at_capacity, figures
