"""`bench.stream_figures.loop_cost_model`: the live loop's serial cost per event split into a per-event, a
per-scored-user and a per-batch part, from the intervals of one run; `serial_intervals`, which
picks those intervals from the run's figures."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.stream_figures import loop_cost_model, serial_intervals

# (users scored per event, applied events per batch) of a catch-up, two drains and three loads.
SHAPES = [(0.17, 45_000.0), (0.56, 13_000.0), (0.21, 17_800.0), (0.99, 125.0), (0.94, 975.0), (0.72, 6_500.0)]


def _following_the_model(shapes: list[tuple[float, float]] = SHAPES) -> list[tuple[str, float, float, float]]:
    """13 us per event + 100 us per scored user + 6 ms per batch."""
    return [(f"i{k}", users, size, 13.0 + 100.0 * users + 6000.0 / size) for k, (users, size) in enumerate(shapes)]


def test_costs_are_recovered_from_intervals_that_follow_the_model() -> None:
    model = loop_cost_model(_following_the_model())
    assert model["per_event_us"] == pytest.approx(13.0)
    assert model["per_user_us"] == pytest.approx(100.0)
    assert model["per_batch_us"] == 6000
    for row in model["intervals"]:
        assert row["fitted_us_per_event"] == pytest.approx(row["measured_us_per_event"])
        assert row["predicted_without_it_us_per_event"] == pytest.approx(row["measured_us_per_event"])


def test_an_interval_off_the_model_is_missed_by_the_fit_without_it() -> None:
    intervals = _following_the_model()
    name, users, size, serial = intervals[1]
    intervals[1] = (name, users, size, serial + 40.0)  # the capacity drain cost 40 us more per event
    model = loop_cost_model(intervals)
    misses = {
        row["interval"]: row["measured_us_per_event"] - row["predicted_without_it_us_per_event"]
        for row in model["intervals"]
    }
    assert misses["i1"] > 30
    # The other large-batch intervals are predicted closer without themselves. (The 125-event
    # batch alone pins the per-batch cost: the fit without it cannot predict it, which is what
    # its check is for.)
    assert all(abs(misses[k]) < misses["i1"] for k in ("i0", "i2", "i5"))


def test_no_costs_without_an_interval_more_than_the_costs_and_their_check() -> None:
    model = loop_cost_model(_following_the_model(SHAPES[:4]))
    assert (model["per_event_us"], model["per_user_us"], model["per_batch_us"]) == (None, None, None)
    assert "4 intervals" in model["why_not"]
    assert model["intervals"] == []


def test_no_costs_from_intervals_too_alike_to_tell_the_costs_apart() -> None:
    # Batches larger than the user count: users per event is users / batch, in lockstep with the
    # per-batch term (the `--quick` sizes, 500 users).
    shapes = [(500.0 / size, size) for size in (1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0)]
    model = loop_cost_model(_following_the_model(shapes))
    assert model["per_user_us"] is None
    assert "too alike" in model["why_not"]


def test_no_costs_when_the_fit_puts_one_below_zero() -> None:
    # Cheaper per event the more users a batch touches: no cost split explains that.
    intervals = [(f"i{k}", users, size, 200.0 - 150.0 * users) for k, (users, size) in enumerate(SHAPES)]
    model = loop_cost_model(intervals)
    assert model["per_user_us"] is None
    assert "below zero" in model["why_not"]


def _drain(users: float | None, events: int, batches: int, loop_us: float, redis_us: float) -> dict[str, Any]:
    return {
        "users_scored_per_event": users,
        "logged_in_events": events,
        "batches": batches,
        "cpu_us_per_event": {"scorer_loop_thread": loop_us, "redis_server": redis_us},
    }


def _load(
    share: float, users: float | None, events: int, batches: int, loop_us: float, redis_us: float
) -> dict[str, Any]:
    return {
        "share_of_capacity": share,
        "users_scored_per_event": users,
        "logged_in_events": events,
        "batches": batches,
        "loop_thread_cpu_us_per_event": loop_us,
        "redis_server_cpu_us_per_event": redis_us,
    }


def testserial_intervals_add_loop_and_redis_and_leave_out_intervals_without_figures() -> None:
    intervals = serial_intervals(
        _drain(0.17, 90_000, 2, 24.0, 7.0),
        _drain(0.56, 26_000, 2, 48.0, 23.0),
        _drain(None, 26_000, 2, 20.0, 6.0),  # no users figure
        [
            _load(0.25, 0.99, 1_000, 8, 110.0, 50.0),
            _load(0.5, 0.94, 0, 0, math.nan, math.nan),  # nothing applied
            _load(0.75, 0.72, 13_000, 2, 57.0, 30.0),
        ],
    )
    assert intervals == [
        ("catch_up_1_process", 0.17, 45_000.0, 31.0),
        ("capacity_at_live_batch", 0.56, 13_000.0, 71.0),
        ("load_25pct", 0.99, 125.0, 160.0),
        ("load_75pct", 0.72, 6_500.0, 87.0),
    ]
