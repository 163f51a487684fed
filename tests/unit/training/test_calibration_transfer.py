"""The served model's calibration must fit the booster it is applied to (the final fit), not the
selection booster: fitted on the backtest folds' out-of-sample scores, moved to the final
booster's intercept; a gate refuses probabilities worse than a constant forecast of the
training churn rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import special

from core.settings import load_settings
from core.timeutil import to_ms
from events.log import load_events, write_partitioned
from features import spec
from models.artifact import load_artifact
from models.calibration import apply
from sim.oracle import oracle_at
from sim.simulator import SimConfig, simulate
from training import backtest, dataset, promotion, registry
from training.pipeline import TrainOptions, train


def _fold(index: int, center: float, rng: np.random.Generator) -> tuple[backtest.FoldResult, np.ndarray]:
    """A fold whose booster's log-odds are the true log-odds moved by `center` + 3.4 (its training
    rows' churn rate moved its intercept); returns it and the true probabilities."""
    n = 3000
    truth_logit = rng.normal(-3.4, 0.8, n)
    labels = rng.random(n) < special.expit(truth_logit)
    raw = special.expit(truth_logit + center + 3.4)
    test = pl.DataFrame({"user_id": [f"u{index}-{i}" for i in range(n)], "label": labels.astype(np.int8)})
    figures = backtest.figures(labels, raw, 0.03)
    fold = backtest.FoldResult((index,), (index,), n, test, raw, figures, raw, 0.03, center)
    return fold, special.expit(truth_logit)


def test_calibration_is_moved_to_the_final_boosters_intercept() -> None:
    rng = np.random.default_rng(1)
    folds = [_fold(i, center, rng)[0] for i, center in enumerate((-4.4, -4.0, -4.2))]
    final_center = -2.9  # the final fit's rows churn more: its raw scores sit higher
    fresh, truth = _fold(9, final_center, rng)
    assert fresh.raw is not None
    aligned, calibrated = backtest.calibrate(folds, final_center)
    unaligned, _ = backtest.calibrate(folds)
    served = apply(aligned, fresh.raw)
    assert abs(served.mean() / truth.mean() - 1) < 0.15
    assert apply(unaligned, fresh.raw).mean() > 2 * truth.mean()  # the intercept carried over
    # Each fold is calibrated without its own rows; the gate's reference figure is there.
    assert all(np.isfinite(f.figures[backtest.NO_SKILL]) for f in calibrated)


def test_gate_refuses_a_backtest_brier_worse_than_the_base_rate() -> None:
    settings = load_settings(gate_min_roc_auc=0.5, gate_min_pr_auc=0.0)
    summary = {
        "roc_auc": {"mean": 0.8, "low": 0.75, "high": 0.85},
        "pr_auc": {"mean": 0.3, "low": 0.2, "high": 0.4},
        "brier": {"mean": 0.03, "low": 0.02, "high": 0.04},
        backtest.NO_SKILL: {"mean": 0.031, "low": 0.02, "high": 0.04},
    }
    rows = registry.GateRows(pl.DataFrame(), pl.DataFrame(), np.zeros(0))
    assert registry.decide(settings, summary, rows, None).promote
    just_above = {**summary, "brier": {"mean": 0.031 * 1.1 + 1e-4, "low": 0.02, "high": 0.04}}
    refused = registry.decide(settings, just_above, rows, None)
    assert not refused.promote
    assert any(r.startswith("fail: backtest Brier") for r in refused.reasons)
    # `churn promote` with no champion applies the same gates to the figures training recorded.
    assert not promotion.judge_against_floors(settings, {"metrics": {"backtest": just_above}}).promote
    assert promotion.judge_against_floors(settings, {"metrics": {"backtest": summary}}).promote
    # A model trained before the reference was recorded is not refused for lacking it: the gate says so.
    older = {k: v for k, v in summary.items() if k != backtest.NO_SKILL}
    kept = registry.decide(settings, older, rows, None)
    assert kept.promote
    assert any(r.startswith("skip: no backtest Brier") for r in kept.reasons)


@pytest.mark.parametrize("seed", [7, 12])
def test_served_probabilities_match_the_true_churn_rate_after_the_log(seed: int, tmp_path: Path) -> None:
    """The registered model, asked about the days after its 44-day log ends (the simulation goes
    on), gives a mean probability within 2x of the simulator's true one. On these two logs the
    selection booster's calibration, carried over to the final booster, served 0.04x and 4.8x.
    (Over seeds 0-19 the ratio is outside 0.5-2 on 7 logs that way, on 2 now: 0.43 and 2.9.)"""
    days, horizon, future_days = 44, 14, 3
    config = SimConfig(users=300, days=days + horizon + future_days, seed=seed)
    sim = simulate(config)
    cut_ms = to_ms(config.start) + days * spec.DAY_MS
    write_partitioned(sim.events.filter(pl.col("ts") < cut_ms), tmp_path / "events")
    result = train(load_settings(state_dir=tmp_path / "state"), tmp_path / "events", TrainOptions(register=False))
    model = load_artifact(result.artifact_dir)

    write_partitioned(sim.events, tmp_path / "continued")
    points, _ = dataset.build(load_events(tmp_path / "continued"), dataset.GridConfig(horizon, 24, 28))
    future = points.filter(pl.col("as_of").is_between(cut_ms, cut_ms + (future_days - 1) * spec.DAY_MS))
    index = {user: i for i, user in enumerate(sim.truth.user_ids)}
    users = np.asarray([index[user] for user in future["user_id"].to_list()])
    truth = oracle_at(sim.truth, users, future["as_of"].to_numpy(), horizon)
    known = np.isfinite(truth)
    assert known.sum() > 0.9 * future.height
    served = model.predict(dataset.feature_matrix(future))[known]
    ratio = served.mean() / truth[known].mean()
    assert 0.5 < ratio < 2.0, (ratio, model.meta["calibration"])
