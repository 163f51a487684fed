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
from training import backtest, fit, metrics, registry, split

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
         "b": rng.normal(size=3 * users), "weight": np.ones(3 * users)}
    )  # fmt: skip
    return frame, risk


FEATURES = ("a", "b")
SOUND = fit.FitConfig(seed=1, learning_rate=0.1, num_leaves=4, min_data_in_leaf=20, feature_fraction=1.0)
OVERFIT = fit.FitConfig(seed=1, learning_rate=0.3, num_leaves=255, min_data_in_leaf=2, feature_fraction=1.0)
NO_CALIBRATION = {"method": "none"}


def _procedure(config: fit.FitConfig, train: pl.DataFrame, rounds: int = 30) -> lgb.Booster:
    """Returns what a training with `config` fits on `train` (the pipeline's own fitting step)."""
    params = fit.booster_params(config, FEATURES, "none", train.height)
    x = train.select(FEATURES).to_numpy()
    return fit.fit_rounds(
        x, train["label"].to_numpy().astype(bool), train["weight"].to_numpy(), params, rounds, FEATURES
    )


def _champion(train: pl.DataFrame, config: fit.FitConfig = SOUND, horizon_days: int = 7) -> ChurnModel:
    """Returns a champion fitted on `train` with `config`, its meta recording its settings and
    its last observation point as a training writes them."""
    last = int(train["as_of"].max())  # type: ignore[arg-type]
    meta = {
        "features": list(FEATURES),
        "calibration": NO_CALIBRATION,
        "horizon_days": horizon_days,
        "imbalance": "none",
        "best_iteration": 30,
        "params": fit.booster_params(config, FEATURES, "none", train.height),
        "data_window": {"final_points": [ms_to_iso(int(train["as_of"].min())), ms_to_iso(last)]},  # type: ignore[arg-type]
    }
    return ChurnModel(_procedure(config, train), meta)


def _earlier(frame: pl.DataFrame, days: int) -> pl.DataFrame:
    """Returns `frame` moved `days` days back in time."""
    return frame.with_columns(pl.col("as_of") - days * DAY)


def _scores(booster: lgb.Booster, frame: pl.DataFrame) -> np.ndarray:
    return np.asarray(booster.predict(frame.select(FEATURES).to_numpy()))


SUMMARY = {"roc_auc": {"mean": 0.8, "low": 0.75, "high": 0.85}, "pr_auc": {"mean": 0.3, "low": 0.2, "high": 0.4}}


def test_paired_gate_accepts_an_equal_challenger_and_refuses_a_worse_one() -> None:
    frame, _ = _rows()
    older, _ = _rows(seed=9)
    settings = load_settings(gate_min_roc_auc=0.6, gate_min_pr_auc=0.05)
    # A champion from an older log: it knew no outcome of these rows, and is compared as served.
    champion = _champion(_earlier(older, 30))
    same = champion.predict(frame.select(FEATURES).to_numpy())
    rng = np.random.default_rng(5)
    worse = same + rng.normal(scale=3 * same.std(), size=len(same))  # same rows, much noisier ranking
    equal = registry.decide(settings, SUMMARY, registry.GateRows(older, frame, same), (champion, "3"))
    assert equal.promote, equal.reasons
    assert equal.paired is not None
    assert equal.paired["difference"] == 0.0
    assert any("champion v3 as served" in r for r in equal.reasons)
    refused = registry.decide(settings, SUMMARY, registry.GateRows(older, frame, worse), (champion, "3"))
    assert not refused.promote
    assert refused.paired is not None
    assert refused.paired["high"] < 0
    assert any(r.startswith("fail: ROC-AUC challenger - champion v3") for r in refused.reasons)


def test_paired_gate_refits_a_champion_that_saw_the_rows_and_refuses_an_overfit_challenger() -> None:
    """A daily retrain: the champion was fitted on the gate rows themselves. Compared as served,
    it wins on memory; its settings refitted on the fold's earlier rows judge the procedures."""
    frame, _ = _rows(users=600, seed=11)
    train, _ = _rows(users=600, seed=12)
    train = _earlier(train, 10)  # the fold's training rows, more than H before the gate rows
    settings = load_settings(gate_min_roc_auc=0.6, gate_min_pr_auc=0.05)
    champion = _champion(pl.concat([train, frame]))
    labels = frame["label"].to_numpy()
    # The same procedure as the champion's: equal on the same information.
    equal = registry.decide(
        settings, SUMMARY, registry.GateRows(train, frame, _scores(_procedure(SOUND, train), frame)), (champion, "4")
    )
    assert equal.promote, equal.reasons
    assert equal.paired is not None
    assert equal.paired["difference"] == 0.0
    assert any(f"settings refitted on the same {train.height} earlier rows" in r for r in equal.reasons)
    assert equal.champion_compared_as == "refitted"
    # A challenger that memorises its training rows: worse on rows it never saw.
    overfit = _scores(_procedure(OVERFIT, train, rounds=300), frame)
    sound = _scores(_procedure(SOUND, train), frame)
    assert metrics.roc_auc(labels, overfit) < metrics.roc_auc(labels, sound) - 0.03
    refused = registry.decide(settings, SUMMARY, registry.GateRows(train, frame, overfit), (champion, "4"))
    assert not refused.promote, refused.reasons
    assert refused.paired is not None
    assert refused.paired["high"] < -settings.gate_auc_tolerance
    low = {**SUMMARY, "roc_auc": {"mean": 0.55, "low": 0.5, "high": 0.6}}
    assert not registry.decide(settings, low, registry.GateRows(train, frame, sound), None).promote


def _user_world(users: int, seed: int, horizon_days: int, times: list[int]) -> pl.DataFrame:
    """Observation points of `users` users at `times`: a risk seen through noise (`a`) and a
    per-user quirk with no bearing on churn (`b`), which a model can use to recognise a user."""
    rng = np.random.default_rng(seed)
    risk, quirk = rng.normal(size=users), rng.normal(size=users)
    churns = rng.random(users) < 1 / (1 + np.exp(1.0 - 0.8 * risk))
    churn_at = np.where(churns, START_MS + rng.uniform(-20, 30, users) * DAY, np.inf)
    parts = []
    for t in times:
        alive = np.flatnonzero(churn_at > t)
        parts.append(
            pl.DataFrame(
                {
                    "user_id": [f"u{i}" for i in alive],
                    "as_of": np.full(len(alive), t, dtype=np.int64),
                    "label": (churn_at[alive] <= t + horizon_days * DAY).astype(np.int8),
                    "a": risk[alive] + rng.normal(scale=1.0, size=len(alive)),
                    "b": quirk[alive] + rng.normal(scale=0.02, size=len(alive)),
                    "weight": np.ones(len(alive)),
                }
            )
        )
    return pl.concat(parts)


def test_paired_gate_refits_a_champion_whose_labels_reach_into_the_rows() -> None:
    """A weekly retrain with H = 14: the champion's last point is a day before the gate rows, so
    its labels told it which of these users churn. The same procedure must not be refused."""
    horizon = 14
    days = [START_MS + d * DAY for d in range(-horizon - 9, 3)]
    world = _user_world(3000, seed=21, horizon_days=horizon, times=days)
    frame = world.filter(pl.col("as_of") >= START_MS)
    train = world.filter(pl.col("as_of") <= START_MS - horizon * DAY)  # the fold: labels end by START_MS
    memory = fit.FitConfig(seed=1, learning_rate=0.1, num_leaves=63, min_data_in_leaf=5, feature_fraction=1.0)
    champion = _champion(world.filter(pl.col("as_of") < START_MS), memory, horizon_days=horizon)
    challenger = _scores(_procedure(memory, train), frame)
    labels = frame["label"].to_numpy()
    as_served = champion.predict(frame.select(FEATURES).to_numpy())
    assert metrics.roc_auc(labels, as_served) > metrics.roc_auc(labels, challenger) + 0.03  # it remembers
    settings = load_settings(gate_min_roc_auc=0.5, gate_min_pr_auc=0.0)
    decision = registry.decide(settings, SUMMARY, registry.GateRows(train, frame, challenger), (champion, "5"))
    assert decision.promote, decision.reasons
    assert decision.paired is not None
    assert decision.paired["difference"] == 0.0
    assert any("settings refitted" in r for r in decision.reasons)


def test_paired_gate_compares_as_served_a_champion_that_records_neither_its_window_nor_its_settings() -> None:
    """A champion registered by other means than `churn train`: compared as served (which can
    only favour it), so a challenger of noise is still refused."""
    frame, _ = _rows(users=600, seed=4)
    champion = _champion(_earlier(_rows(users=600, seed=5)[0], 60))
    for key in ("params", "data_window"):
        champion.meta.pop(key)
    settings = load_settings(gate_min_roc_auc=0.5, gate_min_pr_auc=0.0)
    noise = np.random.default_rng(3).random(frame.height)
    decision = registry.decide(settings, SUMMARY, registry.GateRows(frame, frame, noise), (champion, "6"))
    assert not decision.promote, decision.reasons
    assert "champion v6 as served: it records no settings" in decision.reasons[-1]
    assert decision.champion_compared_as == "served"


def test_paired_gate_meets_the_champion_as_served_from_the_end_of_its_last_label_window() -> None:
    frame, _ = _rows(seed=6)
    older = _earlier(_rows(seed=7)[0], 9)  # last point START - 7 d: labels to START exactly
    champion = _champion(older, horizon_days=7)
    settings = load_settings(gate_min_roc_auc=0.5, gate_min_pr_auc=0.0)
    scores = champion.predict(frame.select(FEATURES).to_numpy())
    decision = registry.decide(settings, SUMMARY, registry.GateRows(older, frame, scores), (champion, "7"))
    assert "champion v7 as served; rows new to both" in decision.reasons[-1]
    assert decision.champion_compared_as == "served"
    later = frame.filter(pl.col("as_of") > START_MS)  # one day in: still new
    later_rows = registry.GateRows(older, later, champion.predict(later.select(FEATURES).to_numpy()))
    assert "as served" in registry.decide(settings, SUMMARY, later_rows, (champion, "7")).reasons[-1]
    earlier = _earlier(frame, 1)  # its first day is inside the champion's last label window
    earlier_rows = registry.GateRows(older, earlier, champion.predict(earlier.select(FEATURES).to_numpy()))
    assert "settings refitted" in registry.decide(settings, SUMMARY, earlier_rows, (champion, "7")).reasons[-1]


def test_the_refit_champion_keeps_its_imbalance_and_its_search_leaf_size() -> None:
    """The champion's procedure as its training ran it on a fold: class weights as chosen, and
    the leaf size of its search setting (its final fit on fewer rows than the fold capped it)."""
    frame, _ = _rows(users=400, seed=31)
    train = _earlier(_rows(users=1500, seed=32)[0], 20)  # 4,500 rows: leaf min(1000, 90) = 90
    config = fit.FitConfig(seed=1, learning_rate=0.1, num_leaves=7, min_data_in_leaf=1000, feature_fraction=1.0)
    champion = _champion(frame, config)  # 1,200 rows: its final fit's leaf was 24
    champion.meta["imbalance"] = "balanced"
    champion.meta["search"] = {"chosen": {"params": {"min_data_in_leaf": 1000}}}
    assert champion.meta["params"]["min_data_in_leaf"] == 24
    challenger = backtest.fit_and_score(train, frame, config, "balanced", 30, NO_CALIBRATION, FEATURES)
    settings = load_settings(gate_min_roc_auc=0.5, gate_min_pr_auc=0.0)
    decision = registry.decide(settings, SUMMARY, registry.GateRows(train, frame, challenger), (champion, "8"))
    assert "settings refitted" in decision.reasons[-1]
    assert decision.paired is not None
    assert decision.paired["difference"] == 0.0, decision.reasons


def test_bootstrap_intervals_cover_the_mean_and_narrow_with_more_users() -> None:
    widths = []
    for users in (200, 3200):
        frame, _risk = _rows(users, seed=3)
        scores = 1 / (1 + np.exp(-frame["a"].to_numpy()))
        fold = backtest.FoldResult((START_MS,), (START_MS + DAY,), 0, frame, scores, {}, scores, 0.1, -2.0)
        fold.figures = backtest.figures(fold.labels, scores, 0.1)
        summary = backtest.summarize([fold], samples=200, seed=0)
        for name in backtest.METRICS:
            assert summary[name]["low"] <= summary[name]["mean"] <= summary[name]["high"], name
        widths.append(summary["roc_auc"]["high"] - summary["roc_auc"]["low"])
    assert widths[1] < widths[0] / 2  # 16 x the users: about a quarter of the width


def test_a_challenger_from_an_older_log_is_refused_even_with_an_equal_procedure() -> None:
    """A retrain on a stale export: the challenger's procedure equals the champion's (the refit
    comparison is +0.0000), but its final model learned outcomes a week less recent than the
    champion's; replacing the champion would serve older knowledge. The same challenger with
    the champion's learning end (within a day: another grid on the same log), or an unknown
    one, passes."""
    frame, _ = _rows(users=600, seed=11)
    train, _ = _rows(users=600, seed=12)
    train = _earlier(train, 10)
    settings = load_settings(gate_min_roc_auc=0.6, gate_min_pr_auc=0.05)
    champion = _champion(pl.concat([train, frame]))
    champion_until = registry.knew_outcomes_until_ms(champion.meta)
    assert champion_until is not None
    scores = _scores(_procedure(SOUND, train), frame)
    older = registry.GateRows(train, frame, scores, champion_until - 7 * DAY)
    refused = registry.decide(settings, SUMMARY, older, (champion, "9"))
    assert not refused.promote
    assert any(r.startswith("fail: challenger learned outcomes up to") for r in refused.reasons), refused.reasons
    assert refused.paired is not None
    assert refused.paired["difference"] == 0.0  # refused for its data, not its procedure
    for until in (champion_until, champion_until - DAY + 1, None):  # the same log on another grid; unknown
        assert registry.decide(
            settings, SUMMARY, registry.GateRows(train, frame, scores, until), (champion, "9")
        ).promote
