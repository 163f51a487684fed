"""`bench.api.find_capacity` and `passes`: the capacity search on a simulated server."""

from __future__ import annotations

from typing import Any

from bench.api import LoadPlan, find_capacity, passes


def _figures(rate: float, p99_ms: float, statuses: dict[str, int] | None = None) -> dict[str, Any]:
    statuses = statuses or {"200": 100}
    return {
        "target_rate": rate,
        "achieved_rate": rate,
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "errors": 0,
        "latency": {"p99_ms": p99_ms},
    }


def test_a_run_passes_only_within_budget_with_every_answer_a_2xx_and_the_rate_achieved() -> None:
    assert passes(_figures(100, 9.9), 10.0)
    assert not passes(_figures(100, 10.1), 10.0)
    assert not passes(_figures(100, 1.0, {"200": 99, "503": 1}), 10.0)
    assert not passes({**_figures(100, 1.0), "achieved_rate": 90.0}, 10.0)
    assert not passes({**_figures(100, 1.0), "errors": 1}, 10.0)


def test_the_search_finds_the_knee_within_its_resolution() -> None:
    asked: list[float] = []

    def server(rate: float) -> dict[str, Any]:  # p99 explodes past 730/s
        asked.append(rate)
        return _figures(rate, 2.0 if rate <= 730 else 50.0)

    found = find_capacity(server, LoadPlan(start_rate=100, resolution=1.1, max_steps=20))
    capacity = found["capacity_per_second"]
    assert 730 / 1.1 <= capacity <= 730
    assert [s["passed"] for s in found["search"]][:4] == [True, True, True, False]  # 100, 200, 400, 800
    assert asked.count(800.0) == 2  # a failing step is tried twice before it counts


def test_a_single_stall_does_not_end_the_search() -> None:
    stalled = [False]

    def server(rate: float) -> dict[str, Any]:
        if rate == 400 and not stalled[0]:
            stalled[0] = True
            return _figures(rate, 300.0)  # one stall of the machine
        return _figures(rate, 2.0 if rate <= 1000 else 50.0)

    assert find_capacity(server, LoadPlan(start_rate=100, max_steps=20))["capacity_per_second"] > 400


def test_capacity_is_zero_when_even_the_lowest_rate_fails() -> None:
    found = find_capacity(lambda rate: _figures(rate, 99.0), LoadPlan(start_rate=80, max_steps=20))
    assert found["capacity_per_second"] == 0.0
    assert min(s["rate"] for s in found["search"]) < 80 / 8
