"""`bench.api.find_capacity` and `passes`: the capacity search on a simulated server; `undisturbed`
on a simulated host."""

from __future__ import annotations

from typing import Any

import pytest

from bench.api import STEAL_LIMIT, STEAL_TRIES, LoadPlan, find_capacity, passes, undisturbed

BUDGET_MS = 10.0


def _figures(
    rate: float, p99_ms: float, statuses: dict[str, int] | None = None, late: int | None = None
) -> dict[str, Any]:
    """A loadgen result of 1,000 requests by default: `late` of the 2xx over the budget (2% when
    the p99 is over it, none otherwise)."""
    statuses = statuses or {"200": 1000}
    requests = sum(statuses.values())
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    if late is None:
        late = requests // 50 if p99_ms > BUDGET_MS else 0
    return {
        "target_rate": rate,
        "achieved_rate": rate,
        "requests": requests,
        "statuses": statuses,
        "errors": 0,
        "budget_ms": BUDGET_MS,
        "ok_within_budget": ok - late,
        "latency": {"p99_ms": p99_ms},
    }


def test_a_run_passes_when_99_percent_are_answered_2xx_within_budget_and_the_rate_is_achieved() -> None:
    assert passes(_figures(100, 9.9))
    assert passes(_figures(100, 9.9, late=10))  # exactly 1% late
    assert not passes(_figures(100, 10.1, late=11))
    assert not passes({**_figures(100, 1.0), "achieved_rate": 90.0})
    assert not passes({**_figures(100, 1.0), "errors": 1})


def test_a_refusal_counts_as_a_late_request_and_any_other_error_status_fails() -> None:
    assert passes(_figures(100, 1.0, {"200": 990, "503": 10}))
    assert not passes(_figures(100, 1.0, {"200": 989, "503": 11}))
    assert passes(_figures(100, 1.0, {"200": 995, "503": 5}, late=5))  # 10 late or refused of 1,000
    assert not passes(_figures(100, 1.0, {"200": 995, "503": 5}, late=6))  # they add up: 11
    assert not passes(_figures(100, 1.0, {"200": 999, "500": 1}))
    assert not passes(_figures(100, 1.0, {"200": 999, "429": 1}))


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
    assert [s["rate"] for s in found["search"]] == [80, 160, 320, 40, 20, 10]


def test_a_failed_first_step_looks_up_before_it_looks_down() -> None:
    # Idle CPUs of a VM wake slowly: the p99 at 100/s is over budget, at 200-730/s within it.
    found = find_capacity(
        lambda rate: _figures(rate, 2.0 if 150 <= rate <= 730 else 50.0), LoadPlan(start_rate=100, max_steps=20)
    )
    assert 730 / 1.1 <= found["capacity_per_second"] <= 730
    assert [s["rate"] for s in found["search"]][:4] == [100, 200, 400, 800]


def test_a_server_slow_above_its_capacity_only_is_found_below_the_start() -> None:
    found = find_capacity(lambda rate: _figures(rate, 2.0 if rate <= 30 else 50.0), LoadPlan(start_rate=100))
    assert 30 / 1.1 <= found["capacity_per_second"] <= 30
    assert [s["rate"] for s in found["search"]][:5] == [100, 200, 400, 50, 25]


class _Host:
    """A clock and a steal counter: each run lasts 1 s, during which the host takes the next of
    `stolen_shares` of the machine's CPU time."""

    def __init__(self, stolen_shares: list[float], cpus: int) -> None:
        self.now = 0.0
        self.stolen = 0.0
        self.shares = list(stolen_shares)
        self.cpus = cpus
        self.runs = 0

    def run(self) -> dict[str, Any]:
        self.runs += 1
        share = self.shares.pop(0)
        self.now += 1.0
        self.stolen += share * self.cpus
        return {"run": self.runs}


@pytest.mark.parametrize(
    ("shares", "runs", "kept"),
    [
        ([0.0], 1, 1),  # a quiet host: one run
        ([STEAL_LIMIT], 1, 1),  # at the limit still counts
        ([0.2, 0.1, 0.01], 3, 3),  # disturbed twice: the third, quiet run counts
        ([0.2, 0.05, 0.3], 3, 2),  # disturbed every time: the least disturbed counts, no more runs
    ],
)
def test_a_run_the_host_disturbed_is_run_again_and_the_least_disturbed_counts(
    shares: list[float], runs: int, kept: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    host = _Host(shares, cpus=2)

    figures = undisturbed(host.run, steal_seconds=lambda: host.stolen, clock=lambda: host.now)

    assert host.runs == runs <= STEAL_TRIES
    assert figures["run"] == kept
    assert figures["tries"] == runs
    assert figures["steal_share"] == pytest.approx(shares[kept - 1])
