"""LightGBM training: early stopping on validation, a measured choice of class-imbalance handling,
monotone constraints where the direction is domain knowledge, calibration on validation, then a
refit on train + validation with the early-stopped tree count.

Why small, heavily regularised trees: churn is rare and one churner labels every observation
point of its last H days, so a training period holds few independent positives (hundreds of
users on a 60-day log). Deep trees with small leaves fit that noise within a few dozen rounds;
shallow trees with large leaves, a slower learning rate and column subsampling generalise
better across periods (measured on simulated logs against the oracle; see FitConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np

from features import spec
from training import calibration, metrics

# Directions we are confident of for an otherwise identical user, on any service: a larger share
# of disliked songs and adverts means more risk, a falling activity trend means more risk.
# Volume counts (songs, sessions, listening time) stay free: their effect depends on the
# others (a heavy listener's thumbs down count is high too), so a constraint would be a guess.
MONOTONE: dict[str, int] = {
    "thumbs_down_7d": 1,
    "thumbs_down_28d": 1,
    "thumbs_down_per_song_28d": 1,
    "adverts_7d": 1,
    "adverts_28d": 1,
    "adverts_per_song_7d": 1,
    "adverts_per_song_28d": 1,
    "songs_trend_7d_vs_21d": -1,
    "sessions_trend_7d_vs_21d": -1,
}
# "none": plain log loss; "balanced": positives up-weighted to the class ratio (is_unbalance).
IMBALANCE_CHOICES = ("none", "balanced")


@dataclass(frozen=True)
class FitConfig:
    """Booster settings. `num_threads` is fixed because LightGBM's results depend on it."""

    seed: int = 7
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other at every
    # split (measured: 100 rounds on 2,500 rows 0.6 s with one thread, 5.5 s with two; on
    # 100,000 rows 7.5 s against 28 s), and the search runs many small fits.
    num_threads: int = 1
    learning_rate: float = 0.02
    num_leaves: int = 7
    # Capped at 2% of the training rows (at least 20), so small logs still get splits.
    min_data_in_leaf: int = 1000
    feature_fraction: float = 0.5
    max_rounds: int = 5000
    early_stopping_rounds: int = 100
    imbalance: tuple[str, ...] = IMBALANCE_CHOICES
    # After early stopping on validation, retrain on train + validation with the same tree count:
    # the validation period is the most recent labelled data before the test period.
    refit: bool = True


@dataclass
class FitResult:
    """The chosen booster and how it was chosen. `booster` is the refit on train + validation when
    `FitConfig.refit`, else the early-stopped booster; `best_iteration` is its tree count;
    `calibration` is fitted on the early-stopped booster's validation scores."""

    booster: lgb.Booster
    params: dict[str, Any]
    imbalance: str
    best_iteration: int
    calibration: dict[str, Any]
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    refit: bool = False


def min_data_in_leaf(config: FitConfig, train_rows: int) -> int:
    """Returns the leaf size used for `train_rows` rows: `config.min_data_in_leaf`, capped at 2%
    of the rows but at least 20."""
    return min(config.min_data_in_leaf, max(20, train_rows // 50))


def booster_params(
    config: FitConfig, features: tuple[str, ...], imbalance: str, train_rows: int | None = None
) -> dict[str, Any]:
    """Returns the LightGBM parameters for one imbalance choice ("none" or "balanced");
    `train_rows` caps the leaf size (see `min_data_in_leaf`)."""
    leaf = config.min_data_in_leaf if train_rows is None else min_data_in_leaf(config, train_rows)
    return {
        "objective": "binary",
        "metric": ["average_precision", "binary_logloss"],
        "first_metric_only": True,
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": leaf,
        "feature_fraction": config.feature_fraction,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "is_unbalance": imbalance == "balanced",
        "monotone_constraints": [MONOTONE.get(name, 0) for name in features],
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": config.num_threads,
        "verbosity": -1,
    }


def fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    valid_groups: np.ndarray,
    config: FitConfig,
    features: tuple[str, ...] = spec.MODEL_FEATURES,
    train_weight: np.ndarray | None = None,
    valid_weight: np.ndarray | None = None,
) -> FitResult:
    """Returns the booster of the imbalance choice with the best validation average precision
    (a ranking metric, unaffected by the class weights' distortion of probabilities; ties go
    to "none"), and its calibration chosen on validation (see `calibration.choose`). With
    `config.refit`, the returned booster is retrained on train + validation with the chosen
    parameters and the early-stopped tree count; the calibration fitted on the early-stopped
    booster's out-of-sample validation scores is kept for it. `train_weight` / `valid_weight`
    are per-row sample weights (None: every row counts 1).

    Raises:
        ValueError: a split has no positive label.
    """
    if not train_y.any() or not valid_y.any():
        msg = "both the training and the validation split need at least one churner"
        raise ValueError(msg)
    results: dict[str, tuple[lgb.Booster, dict[str, Any], np.ndarray]] = {}
    candidates: dict[str, dict[str, float]] = {}
    for choice in config.imbalance:
        params = booster_params(config, features, choice, len(train_y))
        train_set = lgb.Dataset(train_x, train_y, weight=train_weight, feature_name=list(features), free_raw_data=False)
        valid_set = lgb.Dataset(valid_x, valid_y, weight=valid_weight, reference=train_set)
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=config.max_rounds,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False)],
        )
        raw = np.asarray(booster.predict(valid_x, num_iteration=booster.best_iteration))
        results[choice] = (booster, params, raw)
        candidates[choice] = {
            "valid_pr_auc": metrics.average_precision(valid_y, raw),
            "valid_roc_auc": metrics.roc_auc(valid_y, raw),
            "valid_brier_raw": metrics.brier(valid_y, raw),
            "best_iteration": float(booster.best_iteration),
        }
    best = max(config.imbalance, key=lambda c: (candidates[c]["valid_pr_auc"], c == "none"))
    booster, params, raw = results[best]
    chosen = calibration.choose(valid_y, raw, valid_groups)
    rounds = max(int(booster.best_iteration), 1)
    if config.refit:
        weight = None
        if train_weight is not None and valid_weight is not None:
            weight = np.concatenate([train_weight, valid_weight])
        booster = fit_rounds(
            np.vstack([train_x, valid_x]), np.concatenate([train_y, valid_y]), weight, params, rounds, features
        )
    return FitResult(
        booster=booster,
        params=params,
        imbalance=best,
        best_iteration=rounds,
        calibration=chosen,
        candidates=candidates,
        refit=config.refit,
    )


def fit_rounds(
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    params: dict[str, Any],
    rounds: int,
    features: tuple[str, ...] = spec.MODEL_FEATURES,
) -> lgb.Booster:
    """Returns a booster trained on (x, y, weight) with `params` for exactly `rounds` trees (no
    early stopping: the tree count was chosen on a validation period before).

    Raises:
        ValueError: no row has a positive label.
    """
    if not np.asarray(y, dtype=bool).any():
        msg = "the training rows need at least one churner"
        raise ValueError(msg)
    data = lgb.Dataset(x, y, weight=weight, feature_name=list(features))
    return lgb.train(params, data, num_boost_round=max(int(rounds), 1))
