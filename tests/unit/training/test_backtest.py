"""Rolling-origin folds keep their gaps; the final fit reads only finished label windows; the
bootstrap intervals and the paired champion/challenger gate judge the same rows."""

from __future__ import annotations

import itertools

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest

from core.errors import InvalidInputError
from core.settings import load_settings
from core.timeutil import ms_to_iso
from features import spec
from models.artifact import ChurnModel
from tests.support import START_MS
from training import backtest, registry, split

DAY = spec.DAY_MS


@pytest.mark.parametrize("horizon", [1, 3, 7, 14])
@pytest.mark.parametrize("step_hours", [6, 24])
@pytest.mark.parametrize("test_days", [1, 3])
def test_backtest_folds_never_overlap_their_gaps(horizon: int, step_hours: int, test_days: int) -> None:
    rng = np.random.default_rng(horizon * 100 + step_hours + test_days)
    grid = START_MS + np.arange(0, 50 * 24, step_hours) * spec.HOUR_MS
    times = grid[rng.random(len(grid)) > 0.1]  # a few grid times without any point
    folds = split.backtest_folds(times, horizon, test_days, min_train_days=5, max_folds=50)
    assert len(folds) >= 2
    for fold in folds:
        assert fold.train
        assert fold.test
        # No training label window (t, t + H] reaches the test block.
        assert max(fold.train) + horizon * DAY <= min(fold.test)
        assert max(fold.test) - min(fold.test) < test_days * DAY
        assert len({t // DAY for t in fold.train}) >= 5
        assert set(fold.train) | set(fold.test) <= set(times.tolist())
    # Test blocks are disjoint, oldest first, and the latest ends at the latest time.
    for earlier, later in itertools.pairwise(folds):
        assert max(earlier.test) < min(later.test)
    assert folds[-1].test[-1] == times.max()


def test_backtest_folds_are_capped_and_refused_on_a_short_log() -> None:
    times = START_MS + np.arange(40) * DAY
    assert len(split.backtest_folds(times, 7, 3, 7, max_folds=2)) == 2
    with pytest.raises(InvalidInputError, match="too short for one backtest"):
        split.backtest_folds(START_MS + np.arange(10) * DAY, 7, 3, 7)


def test_labelled_times_keep_only_finished_label_windows() -> None:
    times = START_MS + np.arange(30) * DAY
    last_event = START_MS + 29 * DAY + 5 * spec.HOUR_MS
    kept = split.labelled_times(np.concatenate([times, times]), last_event, 7)
    assert kept.tolist() == times[times + 7 * DAY <= last_event].tolist()
    assert kept.max() + 7 * DAY <= last_event
    assert START_MS + 22 * DAY in kept.tolist()
    assert START_MS + 23 * DAY not in kept.tolist()


def _rows(users: int = 400, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """Rows of `users` users over 3 days (user_id, as_of, label, features a, b) and the true risk."""
    rng = np.random.default_rng(seed)
    user = np.repeat([f"u{i}" for i in range(users)], 3)
    risk = np.repeat(rng.normal(size=users), 3) + rng.normal(scale=0.3, size=3 * users)
    label = (rng.random(3 * users) < 1 / (1 + np.exp(2.5 - 1.5 * risk))).astype(np.int8)
    as_of = np.tile(START_MS + np.arange(3) * DAY, users)
    frame = pl.DataFrame(
        {"user_id": user, "as_of": as_of, "label": label, "a": risk + rng.normal(scale=0.3, size=3 * users),
         "b": rng.normal(size=3 * users)}
    )  # fmt: skip
    return frame, risk


def _champion(frame: pl.DataFrame, last_point_ms: int | None) -> ChurnModel:
    x = frame.select("a", "b").to_numpy()
    data = lgb.Dataset(x, frame["label"].to_numpy(), feature_name=["a", "b"])
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4, "seed": 1}, data, num_boost_round=30)
    window = {} if last_point_ms is None else {"final_points": [ms_to_iso(START_MS), ms_to_iso(last_point_ms)]}
    return ChurnModel(booster, {"features": ["a", "b"], "calibration": {"method": "none"}, "data_window": window})


SUMMARY = {"roc_auc": {"mean": 0.8, "low": 0.75, "high": 0.85}, "pr_auc": {"mean": 0.3, "low": 0.2, "high": 0.4}}


def test_paired_gate_accepts_an_equal_challenger_and_refuses_a_worse_one() -> None:
    frame, _ = _rows()
    settings = load_settings(gate_min_roc_auc=0.6, gate_min_pr_auc=0.05)
    # A champion from an older log: the challenger's out-of-sample scores are compared.
    champion = _champion(frame, START_MS - 30 * DAY)
    same = champion.predict(frame.select("a", "b").to_numpy())
    rng = np.random.default_rng(5)
    worse = same + rng.normal(scale=3 * same.std(), size=len(same))  # same rows, much noisier ranking
    equal = registry.decide(settings, SUMMARY, registry.GateRows(frame, same, worse), (champion, "3"))
    assert equal.promote, equal.reasons
    assert equal.paired is not None
    assert equal.paired["difference"] == 0.0
    assert any("challenger out of sample" in r for r in equal.reasons)
    refused = registry.decide(settings, SUMMARY, registry.GateRows(frame, worse, same), (champion, "3"))
    assert not refused.promote
    assert refused.paired is not None
    assert refused.paired["high"] < 0
    assert any(r.startswith("fail: ROC-AUC challenger - champion v3") for r in refused.reasons)


def test_paired_gate_compares_in_sample_scores_when_the_champion_saw_the_rows() -> None:
    frame, _ = _rows(seed=1)
    settings = load_settings(gate_min_roc_auc=0.6, gate_min_pr_auc=0.05)
    champion = _champion(frame, START_MS + 2 * DAY)  # fitted on these very rows
    seen = champion.predict(frame.select("a", "b").to_numpy())
    noise = np.random.default_rng(2).random(frame.height)
    decision = registry.decide(settings, SUMMARY, registry.GateRows(frame, noise, seen), (champion, "4"))
    assert decision.promote, decision.reasons
    assert any("both fitted on them" in r for r in decision.reasons)
    low = {**SUMMARY, "roc_auc": {"mean": 0.55, "low": 0.5, "high": 0.6}}
    assert not registry.decide(settings, low, registry.GateRows(frame, seen, seen), None).promote


def test_bootstrap_intervals_cover_the_mean_and_narrow_with_more_users() -> None:
    widths = []
    for users in (200, 3200):
        frame, _risk = _rows(users, seed=3)
        scores = 1 / (1 + np.exp(-frame["a"].to_numpy()))
        fold = backtest.FoldResult((START_MS,), (START_MS + DAY,), 0, frame, scores, {})
        fold.figures = backtest.figures(fold.labels, scores)
        summary = backtest.summarize([fold], samples=200, seed=0)
        for name in backtest.METRICS:
            assert summary[name]["low"] <= summary[name]["mean"] <= summary[name]["high"], name
        widths.append(summary["roc_auc"]["high"] - summary["roc_auc"]["low"])
    assert widths[1] < widths[0] / 2  # 16 x the users: about a quarter of the width
