"""Rolling-origin backtests with bootstrap confidence intervals over users, and the paired
bootstrap of two models' ROC-AUC difference on the same rows (the champion/challenger gate).

Each fold (see `split.backtest_folds`) fits a booster on every labelled point at least H
before its test block, with the parameters and tree count chosen on the selection split, and
scores the block out of sample. Intervals resample users, not rows: one user's points over
consecutive days are strongly correlated, so a row bootstrap would be too narrow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl
from scipy import special

from features import spec
from models.calibration import EPS
from models.calibration import apply as apply_calibration
from training import calibration as calibration_fit
from training import dataset, fit, metrics, split

# The figures every fold reports; the backtest summary gives each as mean and interval, and
# `NO_SKILL` too when every fold knows its training base rate.
METRICS = ("roc_auc", "pr_auc", "recall_top10", "precision_top10", "brier")
# The Brier score of a constant forecast of the fold's training base rate (the calibration gate).
NO_SKILL = "brier_no_skill"


@dataclass
class FoldResult:
    """One fold's out-of-sample scores on its test rows (calibrated once `calibrate` has run),
    their figures, the booster's own scores and where they sit, and its training churn rate."""

    train_times: tuple[int, ...]
    test_times: tuple[int, ...]
    train_rows: int
    test: pl.DataFrame  # the test rows (user_id, as_of, features, label)
    scores: np.ndarray
    figures: dict[str, float]
    raw: np.ndarray  # the booster's own (uncalibrated) probabilities of the test rows
    train_base_rate: float  # the training rows' weighted churn rate
    # The booster's weighted mean log-odds on its own training rows (`center`): where its raw
    # scores sit, which moves with the training rows' churn rate and class weighting.
    center: float

    @property
    def labels(self) -> np.ndarray:
        """Returns the test rows' labels as bool."""
        return self.test["label"].to_numpy().astype(bool)

    def describe(self) -> dict[str, Any]:
        """Returns the fold's span, sizes and figures as plain values (for logs and the card)."""
        return {
            "train_first": self.train_times[0],
            "train_last": self.train_times[-1],
            "test_first": self.test_times[0],
            "test_last": self.test_times[-1],
            "train_rows": self.train_rows,
            "test_rows": self.test.height,
            "test_churners": int(self.test.filter(pl.col("label") == 1)["user_id"].n_unique()),
            **self.figures,
        }


def figures(labels: np.ndarray, scores: np.ndarray, prior: float = float("nan")) -> dict[str, float]:
    """Returns the backtest figures (`METRICS`) of one set of scores; `prior` is the constant
    forecast `brier_no_skill` is computed for (NaN: NaN)."""
    top = metrics.top_fraction(labels, scores, 0.1)
    return {
        "roc_auc": metrics.roc_auc(labels, scores),
        "pr_auc": metrics.average_precision(labels, scores),
        "recall_top10": top["recall"],
        "precision_top10": top["precision"],
        "brier": metrics.brier(labels, scores),
        NO_SKILL: metrics.brier(labels, np.full(len(labels), prior)),
    }


def run_folds(
    labelled: pl.DataFrame,
    folds: list[split.Fold],
    config: fit.FitConfig,
    imbalance: str,
    rounds: int,
    features: tuple[str, ...] = spec.MODEL_FEATURES,
) -> list[FoldResult]:
    """Returns one result per fold whose training and test parts both hold a churner: a booster
    of `rounds` trees fitted on the fold's training rows (weighted by their `weight` column)
    scores its test rows (uncalibrated: `calibrate` fits the calibration on every fold's
    scores). Folds without a churner on either side are left out (their ROC-AUC is undefined)."""
    results = []
    for fold in folds:
        train = split.take(labelled, fold.train)
        test = split.take(labelled, fold.test)
        labels = test["label"].to_numpy().astype(bool)
        if not (train["label"] == 1).any() or not labels.any():
            continue
        x_train = dataset.feature_matrix(train, features)
        booster = _fit(train, x_train, config, imbalance, rounds, features)
        raw = np.asarray(booster.predict(dataset.feature_matrix(test, features)))
        weight = train["weight"].to_numpy()
        base_rate = float(np.sum(weight * (train["label"].to_numpy() == 1)) / np.sum(weight))
        results.append(
            FoldResult(
                train_times=fold.train,
                test_times=fold.test,
                train_rows=train.height,
                test=test,
                scores=raw,
                figures=figures(labels, raw, base_rate),
                raw=raw,
                train_base_rate=base_rate,
                center=center(np.asarray(booster.predict(x_train)), weight),
            )
        )
    return results


def center(raw: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Returns the (weighted) mean log-odds of a booster's raw probabilities on its training rows."""
    logit = special.logit(np.clip(np.asarray(raw, dtype=np.float64), EPS, 1 - EPS))
    return float(np.average(logit, weights=weight))


def aligned(result: FoldResult, target: float | None) -> np.ndarray:
    """Returns a fold's raw scores moved onto the scale of a booster whose `center` is `target`
    (None: unmoved).

    Raises:
        ValueError: `target` or the fold's center is not finite (scales would be mixed).
    """
    if target is None:
        return result.raw
    if not (np.isfinite(target) and np.isfinite(result.center)):
        msg = f"cannot move a fold's scores between booster scales: centers {result.center} and {target}"
        raise ValueError(msg)
    logit = special.logit(np.clip(result.raw, EPS, 1 - EPS))
    return np.asarray(special.expit(logit - result.center + target))


def calibrate(results: list[FoldResult], target: float | None = None) -> tuple[dict[str, Any], list[FoldResult]]:
    """Returns (the calibration for a model fitted by the folds' procedure, the folds with
    their scores calibrated out of fold). The folds' boosters are fitted as the final model is
    (every labelled point at least H before the scored rows, the same tree count, imbalance and
    leaf-size rule), so their pooled raw scores on later rows are what the calibration must map:
    the method is chosen and each fold's scores calibrated leaving that fold out (folds are
    the blocks); the returned calibration is fitted on every fold's rows. Given `target`, the
    `center` of the booster the calibration is for (the final model), each fold's raw scores
    are first shifted in log-odds by target - its own center: the boosters' intercepts follow
    their training rows' churn rate, and a calibration fitted on one intercept and applied to
    another would carry (and, with a Platt slope above 1, amplify) the difference."""
    labels = np.concatenate([r.labels for r in results])
    raw = np.concatenate([aligned(r, target) for r in results])
    users = np.concatenate([r.test["user_id"].to_numpy() for r in results])
    blocks = np.concatenate([np.full(r.test.height, i) for i, r in enumerate(results)])
    if len(results) > 1:
        chosen, scores = calibration_fit.choose_with_scores(labels, raw, users, blocks=blocks)
        chosen["scheme"] = "leave-one-fold-out"
    else:  # one fold: by user halves within it
        chosen, scores = calibration_fit.choose_with_scores(labels, raw, users)
        chosen["scheme"] = "two halves of the users of the only fold"
    out = []
    for i, result in enumerate(results):
        own = scores[blocks == i]
        out.append(replace(result, scores=own, figures=figures(result.labels, own, result.train_base_rate)))
    return chosen, out


def fit_and_score(
    train: pl.DataFrame,
    test: pl.DataFrame,
    config: fit.FitConfig,
    imbalance: str,
    rounds: int,
    calibration: dict[str, Any],
    features: tuple[str, ...] = spec.MODEL_FEATURES,
) -> np.ndarray:
    """Returns the calibrated scores of `test` by a booster of `rounds` trees with `config` and
    `imbalance`, fitted on `train` (weighted by its `weight` column) over `features`."""
    booster = _fit(train, dataset.feature_matrix(train, features), config, imbalance, rounds, features)
    return apply_calibration(calibration, np.asarray(booster.predict(dataset.feature_matrix(test, features))))


def _fit(
    train: pl.DataFrame,
    x_train: np.ndarray,
    config: fit.FitConfig,
    imbalance: str,
    rounds: int,
    features: tuple[str, ...],
) -> lgb.Booster:
    """Returns a booster of `rounds` trees with `config` and `imbalance` fitted on `train`
    (`x_train`: its feature matrix over `features`; weighted by its `weight` column)."""
    params = fit.booster_params(config, features, imbalance, train.height)
    return fit.fit_rounds(
        x_train,
        train["label"].to_numpy().astype(bool),
        train["weight"].to_numpy(),
        params,
        rounds,
        features,
    )


def _user_codes(frames: list[pl.DataFrame]) -> tuple[list[np.ndarray], int]:
    """Returns each frame's rows as codes of one shared user index, and the number of users."""
    users = np.unique(np.concatenate([frame["user_id"].to_numpy().astype(str) for frame in frames]))
    codes = [np.searchsorted(users, frame["user_id"].to_numpy().astype(str)) for frame in frames]
    return codes, len(users)


def _resampled_rows(codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Returns the row indices of one bootstrap replicate: each row as often as its user was drawn."""
    return np.repeat(np.arange(len(codes)), counts[codes])


def summarize(results: list[FoldResult], samples: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Returns {metric: {mean, low, high}} over the folds: the mean of the folds' figures and
    its `level` percentile interval from `samples` bootstrap replicates that draw users with
    replacement (the same draw for every fold, so a user keeps their weight across folds)."""
    names = METRICS + ((NO_SKILL,) if all(np.isfinite(r.train_base_rate) for r in results) else ())
    codes, n_users = _user_codes([r.test for r in results])
    rng = np.random.default_rng(seed)
    replicates = {name: np.empty(samples) for name in names}
    for b in range(samples):
        counts = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)
        per_fold = []
        for result, code in zip(results, codes, strict=True):
            rows = _resampled_rows(code, counts)
            per_fold.append(figures(result.labels[rows], result.scores[rows], result.train_base_rate))
        for name in names:
            replicates[name][b] = np.nanmean([f[name] for f in per_fold])
    tail = (1 - level) / 2 * 100
    out: dict[str, Any] = {}
    for name in names:
        values = replicates[name][np.isfinite(replicates[name])]
        mean = float(np.nanmean([r.figures[name] for r in results]))
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan, np.nan)
        out[name] = {"mean": mean, "low": float(low), "high": float(high)}
    return out


def _one_sided_bounds(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """Returns the one-sided `level` lower and upper bounds of the finite bootstrap `replicates`
    (NaN, NaN when none is finite)."""
    finite = replicates[np.isfinite(replicates)]
    if not len(finite):
        return float("nan"), float("nan")
    tail = (1 - level) * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def paired_fold_difference(
    challenger: list[FoldResult],
    base: list[FoldResult],
    samples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Returns the mean over folds of ROC-AUC(challenger) - ROC-AUC(base), two sets of backtest
    results on the same folds and rows (`difference`), and the one-sided `level` bounds `low`
    and `high` of its paired bootstrap (users drawn with replacement, the same draw for every
    fold and both models, as in `summarize`).

    Raises:
        ValueError: the two sets do not cover the same test periods.
    """
    if [r.test_times for r in challenger] != [r.test_times for r in base]:
        msg = "the two sets of backtest results cover different test periods"
        raise ValueError(msg)
    codes, n_users = _user_codes([r.test for r in base])
    labels = [r.labels for r in base]
    rng = np.random.default_rng(seed)
    differences = np.empty(samples)
    for b in range(samples):
        counts = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)
        per_fold = []
        for one, other, code, y in zip(challenger, base, codes, labels, strict=True):
            rows = _resampled_rows(code, counts)
            per_fold.append(metrics.roc_auc(y[rows], one.scores[rows]) - metrics.roc_auc(y[rows], other.scores[rows]))
        differences[b] = np.nanmean(per_fold)
    low, high = _one_sided_bounds(differences, level)
    mean = float(
        np.nanmean([a.figures["roc_auc"] - b.figures["roc_auc"] for a, b in zip(challenger, base, strict=True)])
    )
    return {"difference": mean, "low": low, "high": high}


def paired_auc_difference(
    labels: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    users: np.ndarray,
    samples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Returns the ROC-AUC difference challenger - champion on the same rows: `difference`
    (on all rows) and the one-sided `level` bounds `low` and `high` of its paired bootstrap
    (users drawn with replacement; both models scored on the same replicate rows)."""
    y = np.asarray(labels, dtype=bool)
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    _, codes = np.unique(np.asarray(users).astype(str), return_inverse=True)
    n_users = int(codes.max()) + 1 if len(codes) else 0
    rng = np.random.default_rng(seed)
    differences = np.empty(samples)
    for i in range(samples):
        rows = _resampled_rows(codes, np.bincount(rng.integers(0, n_users, n_users), minlength=n_users))
        differences[i] = metrics.roc_auc(y[rows], a[rows]) - metrics.roc_auc(y[rows], b[rows])
    low, high = _one_sided_bounds(differences, level)
    return {
        "difference": metrics.roc_auc(y, a) - metrics.roc_auc(y, b),
        "low": low,
        "high": high,
        "rows": float(len(y)),
    }
