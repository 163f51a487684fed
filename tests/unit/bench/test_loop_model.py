"""`bench.stream.loop_cost_model`: the live loop's serial cost per event split into a per-event, a
per-scored-user and a per-batch part, from the intervals of one run."""

from __future__ import annotations

import pytest

from bench.stream import loop_cost_model

# (users scored per event, applied events per batch) of a catch-up, a capacity drain and three loads.
SHAPES = [(0.17, 45_000.0), (0.56, 13_000.0), (0.99, 125.0), (0.94, 975.0), (0.72, 6_500.0)]


def test_costs_are_recovered_from_intervals_that_follow_the_model() -> None:
    # 13 us per event + 100 us per scored user + 6 ms per batch.
    intervals = [(f"i{k}", users, size, 13.0 + 100.0 * users + 6000.0 / size) for k, (users, size) in enumerate(SHAPES)]
    model = loop_cost_model(intervals)
    assert model["per_event_us"] == pytest.approx(13.0)
    assert model["per_user_us"] == pytest.approx(100.0)
    assert model["per_batch_us"] == 6000
    for row in model["intervals"]:
        assert row["predicted_us_per_event"] == pytest.approx(row["measured_us_per_event"])


def test_an_interval_off_the_model_shows_in_its_own_check() -> None:
    intervals = [(f"i{k}", users, size, 13.0 + 100.0 * users + 6000.0 / size) for k, (users, size) in enumerate(SHAPES)]
    name, users, size, serial = intervals[1]
    intervals[1] = (name, users, size, serial + 40.0)  # the capacity drain cost 40 us more per event
    model = loop_cost_model(intervals)
    checks = {
        row["interval"]: row["measured_us_per_event"] - row["predicted_us_per_event"] for row in model["intervals"]
    }
    assert checks["i1"] > 15
    assert max(abs(v) for k, v in checks.items() if k != "i1") < checks["i1"]


def test_no_costs_without_more_intervals_than_costs() -> None:
    model = loop_cost_model([(f"i{k}", users, size, 50.0) for k, (users, size) in enumerate(SHAPES[:3])])
    assert model["per_event_us"] is None
    assert model["per_user_us"] is None
    assert model["per_batch_us"] is None
    assert model["intervals"] == []
