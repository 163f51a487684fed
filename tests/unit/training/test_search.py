"""The hyper-parameter search: its results do not depend on how many threads fit the boosters,
and its time budget stops it after the first trial when that trial used the budget up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bench.harness import SMALL_SIMULATION
from events.log import load_events, write_partitioned
from sim.simulator import simulate
from training import fit, search, split
from training.pipeline import TrainOptions, build_training_set

HORIZON = 7
# Both imbalance choices, so the selection's parallel fits are exercised too.
BASE = fit.FitConfig(max_rounds=150, early_stopping_rounds=20)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, split.TimeSplit, list[split.Fold]]:
    root: Path = tmp_path_factory.mktemp("log") / "events"
    write_partitioned(simulate(SMALL_SIMULATION).events, root)
    frame, _, times = build_training_set(load_events(root), TrainOptions(horizon_days=HORIZON), HORIZON)
    folds = split.backtest_folds(frame["as_of"].to_numpy(), HORIZON, 3, 7, 3)
    return frame, times, folds


def test_search_results_do_not_depend_on_the_worker_count(
    labelled: tuple[pl.DataFrame, split.TimeSplit, list[split.Fold]],
) -> None:
    frame, times, folds = labelled
    one = search.search(frame, times, folds, BASE, trials=3, seconds=600, workers=1)
    two = search.search(frame, times, folds, BASE, trials=3, seconds=600, workers=2)
    assert len(one) == len(two) == 3
    assert len(one[0].folds) >= 2  # several folds ran side by side
    for a, b in zip(one, two, strict=True):
        assert (a.selection.imbalance, a.selection.best_iteration) == (
            b.selection.imbalance,
            b.selection.best_iteration,
        )
        assert a.selection.candidates == b.selection.candidates
        assert np.array_equal(a.selection.valid_scores, b.selection.valid_scores)
        assert [f.test_times for f in a.folds] == [f.test_times for f in b.folds]
        for fa, fb in zip(a.folds, b.folds, strict=True):
            assert np.array_equal(fa.scores, fb.scores)
        assert a.score == b.score


def test_search_stops_when_the_first_trial_used_the_budget(
    labelled: tuple[pl.DataFrame, split.TimeSplit, list[split.Fold]],
) -> None:
    frame, times, folds = labelled
    lines: list[str] = []
    trials = search.search(frame, times, folds, BASE, trials=3, seconds=0, progress=lines.append, workers=2)
    assert [t.number for t in trials] == [0]
    assert any("stopped after 1 trial(s)" in line for line in lines)


def test_map_boosters_keeps_order_and_raises_the_first_error() -> None:
    assert fit.map_boosters(lambda x: x * x, range(7), workers=3) == [x * x for x in range(7)]

    def fail_on_three(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x

    with pytest.raises(ValueError, match="three"):
        fit.map_boosters(fail_on_three, range(6), workers=2)
