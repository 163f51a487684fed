"""`churn bench api` on tiny settings: both servers start, every figure the report promises is there."""

from __future__ import annotations

import pytest

from bench.api import LoadPlan, bench_api
from core.settings import Settings

TINY = LoadPlan(step_seconds=0.5, warmup_seconds=0.2, measure_seconds=0.5, connections=4, start_rate=50, max_steps=2)


@pytest.mark.soak  # two servers started, a model trained: ~90 s, the slowest test of `make test` before
@pytest.mark.slow
def test_the_api_bench_reports_capacity_latency_and_cpu_for_ours_and_feast_serve(settings: Settings) -> None:
    progress: list[str] = []
    figures = bench_api(settings, users=200, plan=TINY, modes=("score", "batch_100"), say=progress.append)

    assert figures["machine"]["cpu_model"]
    assert figures["latency_budget_ms"] == TINY.budget_ms
    for mode in ("score", "batch_100", "feast_serve"):
        found = figures[mode]
        assert 1 <= len(found["search"]) <= TINY.max_steps
        assert found["capacity_per_second"] == max([0.0] + [s["rate"] for s in found["search"] if s["passed"]])
        if found["capacity_per_second"]:  # the shared machine may pass no step at all in 0.5 s runs
            for share in ("at_50pct", "at_100pct"):
                assert found[share]["cpu_ms_per_request"] > 0
                assert found[share]["p50_ms"] <= found[share]["p99_ms"] <= found[share]["p999_ms"]
                assert set(found[share]["statuses"]) <= {"200", "503"}
                # Ours reports the in-flight limit it ran with (derived: at least the start of 4).
                assert (found[share].get("in_flight_limit", 0) >= 2) == (mode != "feast_serve")
    assert figures["batch_100"]["capacity_users_per_second"] == 100 * figures["batch_100"]["capacity_per_second"]
    measures = ("users_per_second", "cpu_bound_users")
    ratios = {f"{mode}_{measure}_vs_feast_serve" for mode in ("score", "batch_100") for measure in measures}
    assert set(figures["ratios"]) == ratios
    for mode in ("score", "batch_100", "feast_serve"):
        assert figures[mode]["cpu_ms_per_request_in_search"] > 0
    assert any("feast serve" in line for line in progress)
