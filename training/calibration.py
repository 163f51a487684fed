"""Fitting a probability calibration that serialises to plain JSON (applied by `models.calibration`).

A calibrator maps the booster's raw probability to a calibrated one:
- `none`: identity;
- `platt`: sigmoid(a * logit(p) + b), two numbers;
- `isotonic`: a non-decreasing step fit (pool adjacent violators), stored as breakpoints
  `x` (raw probabilities, increasing) and `y` (calibrated), applied with linear interpolation
  between breakpoints and clamped beyond them, so it stays monotone and ranks are kept; its
  lowest and highest steps are never exactly 0 or 1 (`_off_the_bounds`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import optimize, special

from models.calibration import EPS, apply
from training import metrics


def fit_platt(labels: np.ndarray, raw: np.ndarray) -> dict[str, Any]:
    """Returns a Platt calibration {method, a, b} fitted by maximum likelihood, with `a` >= 0."""
    y = np.asarray(labels, dtype=np.float64)
    logit = special.logit(np.clip(np.asarray(raw, dtype=np.float64), EPS, 1 - EPS))

    def loss(params: np.ndarray) -> float:
        z = params[0] * logit + params[1]
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    # The slope is kept at 0 or above: a negative one reverses the model's ranking. Fitted freely
    # on a small validation set it was (a = -1.51: 60% of users in the high tier).
    result = optimize.minimize(loss, x0=np.array([1.0, 0.0]), method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    return {"method": "platt", "a": float(result.x[0]), "b": float(result.x[1])}


def fit_isotonic(labels: np.ndarray, raw: np.ndarray, max_points: int = 512) -> dict[str, Any]:
    """Returns an isotonic calibration {method, x, y}: pool adjacent violators on the rows
    sorted by raw probability, one breakpoint per pooled block (at its mean raw probability and
    churn rate, kept off 0 and 1 by `_off_the_bounds`), thinned to at most `max_points`
    breakpoints to keep the artifact small."""
    order = np.argsort(raw, kind="mergesort")
    x_sorted = np.asarray(raw, dtype=np.float64)[order]
    y_sorted = np.asarray(labels, dtype=np.float64)[order]
    # Blocks as (sum of y, sum of x, count); merge while a block's mean is not above the previous one.
    sums: list[float] = []
    xs: list[float] = []
    counts: list[float] = []
    for xv, yv in zip(x_sorted, y_sorted, strict=True):
        sums.append(yv)
        xs.append(xv)
        counts.append(1.0)
        while len(sums) > 1 and sums[-2] / counts[-2] >= sums[-1] / counts[-1]:
            s, x, c = sums.pop(), xs.pop(), counts.pop()
            sums[-1] += s
            xs[-1] += x
            counts[-1] += c
    x_points = np.array(xs) / np.array(counts)
    y_points = _off_the_bounds(np.array(sums), np.array(counts))
    if len(x_points) > max_points:
        keep = np.unique(np.linspace(0, len(x_points) - 1, max_points).round().astype(int))
        x_points, y_points = x_points[keep], y_points[keep]
    return {"method": "isotonic", "x": x_points.tolist(), "y": y_points.tolist()}


def _off_the_bounds(positives: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Returns the pooled blocks' churn rates (`positives / counts`, increasing), with a first
    block of no churners and a last block of only churners moved off 0 and 1.

    Why: such a block's rate is a certainty that a few dozen rows cannot give, and it was served
    as is: users scored up to the first breakpoint got a probability of exactly 0 (a log-odds of
    minus infinity for anything downstream that takes one). They get the Jeffreys estimate
    (positives + 1/2) / (count + 1) instead, kept below the next block's rate (at most half of
    it; at the top, above the previous one's), so the steps stay increasing and the ranking is
    kept.
    """
    rates = positives / counts
    if rates[0] == 0.0:
        rates[0] = 0.5 / (counts[0] + 1.0)
        if len(rates) > 1:
            rates[0] = min(rates[0], rates[1] / 2)
    if rates[-1] == 1.0:
        rates[-1] = (counts[-1] + 0.5) / (counts[-1] + 1.0)
        if len(rates) > 1:
            rates[-1] = max(rates[-1], (1.0 + rates[-2]) / 2)
    return rates


_FITTERS: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, Any]]] = {
    "platt": fit_platt,
    "isotonic": fit_isotonic,
}


def choose(
    labels: np.ndarray, raw: np.ndarray, groups: np.ndarray, folds: int = 2, blocks: np.ndarray | None = None
) -> dict[str, Any]:
    """Returns the calibration to use, fitted on all of (labels, raw), with how it was chosen.

    Each method is scored by its out-of-fold log loss (folds by `groups`, e.g. user ids, so
    one user's rows never sit on both sides; or, given `blocks`, one fold per distinct block,
    e.g. a backtest fold's index); a method is used only if it beats the raw probabilities'
    log loss, else `none` (log loss, not Brier: an overconfident end step, a probability near
    0 for rows that do churn, costs little Brier but much log loss). The returned dict carries
    `method`, its parameters and `selection` (the out-of-fold Brier and log loss of every
    candidate).
    """
    return choose_with_scores(labels, raw, groups, folds, blocks)[0]


def choose_with_scores(
    labels: np.ndarray, raw: np.ndarray, groups: np.ndarray, folds: int = 2, blocks: np.ndarray | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """Returns (`choose`'s calibration, the chosen method's out-of-fold calibrated scores of the
    rows): each row calibrated by the method fitted without its fold (raw where that is
    impossible, and for `none`)."""
    y = np.asarray(labels, dtype=bool)
    raw = np.asarray(raw, dtype=np.float64)
    if blocks is None:
        fold = np.asarray([hash_group(g) % folds for g in groups])
    else:
        fold = np.unique(np.asarray(blocks), return_inverse=True)[1]
    scores = {"none": {"brier": metrics.brier(y, raw), "log_loss": metrics.log_loss(y, raw)}}
    out_of_fold_scores = {"none": raw}
    for name, fit in _FITTERS.items():
        out_of_fold = np.empty_like(raw)
        for k in np.unique(fold):
            held = fold == k
            if held.all() or not held.any() or not y[~held].any():
                out_of_fold[held] = raw[held]
                continue
            out_of_fold[held] = apply(fit(y[~held], raw[~held]), raw[held])
        scores[name] = {"brier": metrics.brier(y, out_of_fold), "log_loss": metrics.log_loss(y, out_of_fold)}
        out_of_fold_scores[name] = out_of_fold
    best = min(scores, key=lambda name: (scores[name]["log_loss"], name != "none"))
    chosen = {"method": "none"} if best == "none" else _FITTERS[best](y, raw)
    return {**chosen, "selection": scores}, out_of_fold_scores[best]


def hash_group(group: object) -> int:
    """Returns a stable (process-independent) non-negative hash of a group key."""
    text = str(group).encode()
    value = 0
    for byte in text:
        value = (value * 131 + byte) % 2_147_483_647
    return value
