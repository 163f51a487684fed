"""`churn demo`'s own rules: the history it simulates is long enough for its first training."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from churn.demo import min_history_days, run_demo
from core.errors import InvalidInputError
from core.settings import Settings
from events.log import events_frame
from sim.simulator import SimConfig, simulate
from training.pipeline import TrainOptions, build_training_set


@pytest.mark.parametrize("horizon_days", [7, 14])
def test_the_shortest_history_allowed_is_the_shortest_the_training_splits(horizon_days: int) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    needed = min_history_days(horizon_days)
    enough = simulate(SimConfig(users=300, days=needed, start=start, seed=3)).events
    _, _, split = build_training_set(events_frame(enough), TrainOptions(), horizon_days)
    assert all(len(times) > 0 for times in (split.train, split.valid, split.test))
    short = simulate(SimConfig(users=300, days=needed - 1, start=start, seed=3)).events
    with pytest.raises(InvalidInputError, match="too short for train, validation and test"):
        build_training_set(events_frame(short), TrainOptions(), horizon_days)


def test_a_history_too_short_to_train_on_is_refused_before_anything_starts() -> None:
    said: list[str] = []
    settings = Settings(kafka_bootstrap="127.0.0.1:1", horizon_days=14)  # nothing listens: nothing is used
    with pytest.raises(InvalidInputError, match="--days 43: the first training needs at least 44 days"):
        run_demo(settings, users=10, days=43, rate=1, duration=1, say=said.append)
    assert said == []
