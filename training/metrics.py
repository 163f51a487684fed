"""Classification metrics on numpy/scipy (no scikit-learn): ranking, top-k, probability quality.

Every function takes `labels` (0/1 or bool) and `scores` (higher = riskier) of equal length and
returns NaN where the metric is undefined (e.g. one class missing), never raises on that.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def _arrays(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        msg = f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}"
        raise ValueError(msg)
    return y, s


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Returns the ROC-AUC by the Mann-Whitney rank statistic (ties count half)."""
    y, s = _arrays(labels, scores)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Returns the average precision (PR-AUC as sum of precision x recall steps).

    Tied scores form one threshold, as in scikit-learn's `average_precision_score`.
    """
    y, s = _arrays(labels, scores)
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    precision, recall = precision_recall_curve(y, s)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _thresholds(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Returns, at every distinct score threshold from the highest down, the true positives and
    the rows flagged (score >= threshold), and the counts of positives and negatives."""
    y, s = _arrays(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    positives = int(y.sum())
    return np.cumsum(y)[last_of_tie], last_of_tie + 1, positives, len(y) - positives


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (precision, recall) at every distinct score threshold, from the highest down."""
    true_pos, flagged, positives, _ = _thresholds(labels, scores)
    return true_pos / flagged, true_pos / max(positives, 1)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (false positive rate, true positive rate) at every distinct threshold, from (0, 0)."""
    true_pos, flagged, positives, negatives = _thresholds(labels, scores)
    return np.r_[0.0, (flagged - true_pos) / max(negatives, 1)], np.r_[0.0, true_pos / max(positives, 1)]


def top_fraction(labels: np.ndarray, scores: np.ndarray, fraction: float = 0.1) -> dict[str, float]:
    """Returns precision, recall and lift among the `fraction` riskiest rows.

    The top k = ceil(fraction x n) rows by score are flagged (ties broken by row order, stable),
    lift = precision / base rate.
    """
    y, s = _arrays(labels, scores)
    if len(y) == 0 or not y.any():
        return {"precision": float("nan"), "recall": float("nan"), "lift": float("nan")}
    k = max(1, int(np.ceil(fraction * len(y))))
    top = np.argsort(-s, kind="mergesort")[:k]
    hits = int(y[top].sum())
    precision = hits / k
    return {"precision": precision, "recall": hits / int(y.sum()), "lift": precision / float(y.mean())}


def brier(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Returns the Brier score, the mean squared error of the probabilities."""
    y, p = _arrays(labels, probabilities)
    return float(np.mean((p - y) ** 2)) if len(y) else float("nan")


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-12) -> float:
    """Returns the mean negative log-likelihood, probabilities clipped to [eps, 1 - eps]."""
    y, p = _arrays(labels, probabilities)
    if not len(y):
        return float("nan")
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def calibration_curve(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Returns the reliability curve on equal-count bins of the probabilities:
    mean predicted probability, observed rate and row count per non-empty bin."""
    y, p = _arrays(labels, probabilities)
    order = np.argsort(p, kind="mergesort")
    predicted, observed, counts = [], [], []
    for chunk in np.array_split(order, min(bins, max(len(p), 1))):
        if len(chunk):
            predicted.append(float(p[chunk].mean()))
            observed.append(float(y[chunk].mean()))
            counts.append(float(len(chunk)))
    return {"predicted": predicted, "observed": observed, "count": counts}
