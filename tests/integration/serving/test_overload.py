"""`churn serve` (real uvicorn, one worker, default settings) on the real Redis at 3x its capacity.

Capacity is measured here, in the test, as `churn bench api` measures it: the highest open-loop
rate at which 99% of the requests are answered 200 within the latency budget, a refusal counting
as a late request (a failing step runs twice). With "every request answered 200", a search could
stop at a third of the server's capacity on 3 refusals in a stall, and "3x" then shed almost
nothing. Then 10 s at that rate; if the server answered fewer 200s per second there than the rate
(a 3 s step can miss the machine's stalls), that lower rate is the capacity the test works from.
The machine is shared and its speed varies, so every assertion compares figures of this run
with each other. At 3x capacity for 20 s the accepted requests must stay about as fast as at
capacity (p99 at most 2x; without shedding, every one of the 128 connections would wait in the
worker's queue: 128 service times, tens of times the bound), every other answer must be a 503
with `Retry-After`, and once the load drops the latency must be back to normal within 5 s (p90
within 2x of the calm p90 before the overload, p99 within 2x of the p99 at capacity; at most 1%
shed, as a stall can line up four requests at half capacity, or twice the share shed before).

Capacity here is a latency figure, and on a jittery host it can be a third of what the worker
completes: one CI run found 275/s, and "3x" (825/s) was answered 200 at 807/s, 2% shed, so the
run never overloaded the server and showed nothing about shedding. The overload must therefore
be one: at least 10% shed (`MIN_SHED_SHARE`). A run that sheds less is run again at twice the
rate, up to 12x capacity. "As fast as at capacity" means within 2x of the p99 at capacity or of
the latency budget, whichever is higher: the search holds capacity to "99% within the budget", so
a p99 at capacity far below the budget (2.8 ms against 10 ms in that run) is a calm window, not
the speed the server promises; an accepted request waits behind at most `limit - 1` others, about
a quarter of the budget of service time with the derived limit, and that run's accepted p99 was 13.1 ms
(with 4 in flight).

The p99 at capacity is measured in two 10 s runs at capacity, one just before the overload and one
after it. At capacity every stall of the shared machine delays all the requests queued behind it,
so one 10 s window's p99 depends on how many stalls it caught: 3.3 to 11.9 ms on the same server
in one session, and 32.1 ms before an overload against 8.3 ms after it in one CI run. The
overload is held to the slower of the two: in that run it was 44.9 ms, 1.4x the window before it
(the machine was slow then, and the calm window before the overload too) but 5.4x the calm one
after it, so a mean of the two (20.2 ms) failed a server that shed as it should.

The host's stalls last seconds: one CI run's 5 s window after the overload shed 215 of 2,000
requests at half capacity with a p90 of 19 ms (2.5 ms before), and the same test passed when
run again. So a window after the overload that is not normal is measured once more, right after
it, and that one must be: a server left broken (a leaked in-flight count refuses everything, a
backlog still draining holds every request) fails both. Each window records the share of the
machine's CPU time the hypervisor took (`steal_share`, /proc/stat), and, as in `churn bench
api`, a window in which it took more than 3% is run again, up to 3 tries, the least disturbed
counting (`bench.api.undisturbed`): the dev VM's calm windows took 0.1-0.5% on a quiet host, and
11-34% in the hour that one run here failed, shedding 8-28% at half capacity.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench.api import MODES, LoadPlan, find_capacity, in_flight_limit, load, undisturbed
from core.settings import Settings
from tests.support import churn_serve, record_figures

USERS = 2000
OVERLOAD_SECONDS = 20.0
BACK_TO_NORMAL_SECONDS = 5.0
CONNECTIONS = 128
# An overload run must shed at least this share of its requests (see the docstring), else it is
# run again at twice the rate, up to the last multiple of capacity.
MIN_SHED_SHARE = 0.10
OVERLOAD_MULTIPLES = (3, 6, 12)
# What is kept of a run's figures; the latency from the actual send (`ok_service_latency`) says how
# much of the latency was the load generator's own lateness.
CALM_FIGURES = ("statuses", "latency", "steal_share", "tries")
KEPT_FIGURES = ("achieved_rate", "statuses", "latency", "ok_latency", "ok_service_latency", "steal_share", "tries")


@pytest.mark.soak
def test_at_three_times_capacity_accepted_requests_stay_fast_and_the_rest_are_shed(
    settings: Settings, tmp_path: Path, unique: str
) -> None:
    mode = MODES["score"]
    with churn_serve(settings, tmp_path, f"overload{unique}", USERS) as served:
        port = served.port

        def run(rate: float, seconds: float, warmup: float = 0.5) -> dict[str, Any]:
            budget = settings.api_latency_budget_ms
            return undisturbed(lambda: load(port, USERS, mode, rate, seconds, CONNECTIONS, warmup, budget))

        # Warm: the first requests import and compile. 10 s, not 2: one CI run's search began while the
        # server (or the machine) was still slow, failed at 200/s and 100/s (p99 34 and 11 ms), then
        # passed 50-94/s with p99 4-8 ms, so "3x capacity" was 281/s and nothing was shed.
        run(100, 10.0)
        plan = LoadPlan(budget_ms=settings.api_latency_budget_ms, connections=CONNECTIONS, start_rate=200.0)
        found = find_capacity(lambda rate: run(rate, plan.step_seconds), plan)
        searched, search = found["capacity_per_second"], found["search"]
        assert searched > 0, search
        at_capacity = run(searched, 10.0)  # as long as `churn bench api` measures it: a steadier p99
        capacity = sustained(at_capacity, searched)
        calm_before = run(capacity / 2, 5.0)
        limit_when_calm = in_flight_limit(port)  # derived from the service time per request by now
        overloads = []
        for multiple in OVERLOAD_MULTIPLES:
            overloads.append(run(multiple * capacity, OVERLOAD_SECONDS))
            if shed_share(overloads[-1]) >= MIN_SHED_SHARE:
                break
        overload = overloads[-1]
        # The overload's sending stopped `drain_seconds` before it returned; measure from 5 s after that.
        dropped_at = time.monotonic() - overload["drain_seconds"]
        warmup = max(0.0, BACK_TO_NORMAL_SECONDS - (time.monotonic() - dropped_at))
        calm_after = [run(capacity / 2, 5.0, warmup=warmup)]
        if not back_to_normal(calm_after[0], calm_before):
            calm_after.append(run(capacity / 2, 5.0))
        at_capacity_after = run(capacity, 10.0)
        alive = served.server.poll() is None
    log = served.log

    p99_at_capacity = max(at_capacity["ok_latency"]["p99_ms"], at_capacity_after["ok_latency"]["p99_ms"])
    accepted_p99_bound = 2 * max(p99_at_capacity, settings.api_latency_budget_ms)
    figures = {
        "searched_capacity_per_second": searched,
        "capacity_per_second": capacity,
        "search": search,
        "max_in_flight": settings.api_max_in_flight,
        "in_flight_limit_when_calm": limit_when_calm.get("in_flight_limit"),
        "calm_before": {k: calm_before[k] for k in CALM_FIGURES},
        "at_capacity": {k: at_capacity[k] for k in KEPT_FIGURES},
        "at_capacity_after": {k: at_capacity_after[k] for k in KEPT_FIGURES},
        "p99_at_capacity_ms": p99_at_capacity,
        "overload": {k: overload[k] for k in ("target_rate", "errors", "drain_seconds", *KEPT_FIGURES)},
        "overload_shed_shares": [round(shed_share(window), 4) for window in overloads],
        "accepted_p99_bound_ms": accepted_p99_bound,
        "overload_unavailable_without_retry_after": overload["unavailable_without_retry_after"],
        "calm_after_warmup_seconds": round(warmup, 2),
        "calm_after": [{k: window[k] for k in CALM_FIGURES} for window in calm_after],
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
    assert shed_share(overload) >= MIN_SHED_SHARE, figures
    assert overload["unavailable_without_retry_after"] == 0
    assert overload["errors"] == 0, overload["first_errors"]
    assert overload["ok_latency"]["p99_ms"] <= accepted_p99_bound, figures
    assert statuses["200"] / overload["seconds"] >= 0.5 * capacity, figures
    # Back to normal within 5 s of the drop, or in the window right after it (see the docstring).
    assert back_to_normal(calm_after[-1], calm_before), figures
    assert calm_after[-1]["latency"]["p99_ms"] <= 2 * p99_at_capacity, figures


def sustained(at_capacity: dict[str, Any], searched: float) -> float:
    """Returns the capacity the rest of the test works from: the searched rate, or the rate the
    10 s run at it answered 200 if lower.

    A 3 s search step can pass above what the server sustains when it misses the machine's stalls:
    one search here passed 1,600/s, where the 10 s run at it answered 1,022/s and shed the rest, so
    "half capacity" shed 7% before the overload ever began.
    """
    return round(min(searched, at_capacity["statuses"].get("200", 0) / at_capacity["seconds"]), 1)


def shed_share(window: dict[str, Any]) -> float:
    """Returns the share of a run's requests answered 503."""
    return float(window["statuses"].get("503", 0) / window["requests"])


def back_to_normal(calm_after: dict[str, Any], calm_before: dict[str, Any]) -> bool:
    """Returns whether a window at half capacity after the overload is as before it: nothing but
    200s and 503s, at most 1% shed (or twice the share shed before, when that was higher), no
    errors, and a p90 within 2x of the one before.

    At half capacity four requests are rarely in flight at once, but a stall of the shared machine
    can line them up: one CI run shed 1 of 1,147. A worker still draining the overload would shed
    most of them. The bulk must be as fast as before; not the windows' p99s against each other: 5 s
    at half capacity hold ~1,000 requests, so a p99 is the 10th slowest and one stall moves it (one
    CI run: 8.2 ms after, 3.9 ms before, p90 2.0 and 1.8 ms).
    """
    statuses = calm_after["statuses"]
    return (
        set(statuses) <= {"200", "503"}
        and statuses.get("503", 0) / calm_after["requests"] <= max(0.01, 2 * shed_share(calm_before))
        and calm_after["errors"] == 0
        and calm_after["latency"]["p90_ms"] <= 2 * calm_before["latency"]["p90_ms"]
    )
