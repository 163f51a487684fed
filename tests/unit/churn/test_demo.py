"""`churn demo`'s own rules: the history it simulates is long enough for its first training."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from churn.demo import run_demo
from core.errors import InvalidInputError
from core.settings import Settings
from events.log import events_frame
from sim.simulator import SimConfig, simulate
from training import split
from training.pipeline import TrainOptions, build_training_set, min_log_days


def passes_the_training_checks(settings: Settings, days: int) -> bool:
    """Returns True when a simulated history of `days` days passes what `train` checks before
    its search: the selection split and at least one backtest fold."""
    history = simulate(SimConfig(users=200, days=days, start=datetime(2026, 1, 1, tzinfo=UTC), seed=3)).events
    options = TrainOptions()
    try:
        labelled, _, _ = build_training_set(events_frame(history), options, settings.horizon_days)
        split.backtest_folds(
            labelled["as_of"].to_numpy(), settings.horizon_days, settings.train_backtest_days,
            options.min_train_days, settings.train_backtest_folds,
        )  # fmt: skip
    except InvalidInputError:
        return False
    return True


@pytest.mark.parametrize(("horizon_days", "backtest_days"), [(14, 3), (7, 3), (3, 3), (14, 20)])
def test_the_shortest_history_allowed_is_the_shortest_the_training_accepts(
    horizon_days: int, backtest_days: int
) -> None:
    settings = Settings(horizon_days=horizon_days, train_backtest_days=backtest_days)
    needed = min_log_days(settings)
    assert passes_the_training_checks(settings, needed)
    assert not passes_the_training_checks(settings, needed - 1)


def test_a_history_too_short_to_train_on_is_refused_before_anything_starts() -> None:
    said: list[str] = []
    settings = Settings(kafka_bootstrap="127.0.0.1:1", horizon_days=14)  # nothing listens: nothing is used
    with pytest.raises(InvalidInputError, match="--days 43: the first training needs at least 44 days"):
        run_demo(settings, users=10, days=43, rate=1, duration=1, say=said.append)
    assert said == []
