"""Model performance on a daily snapshot: realized once the labels are known, expected before.

Realized: the snapshot of day t (users active in the lookback at t, scored by the champion) is
labelled when the event clock passes t + H: churned = a `Cancellation Confirmation` in (t, t+H],
as training labels its observation points. The figures are `training.metrics`' (the evaluation's),
so the stream's realized figures and an offline computation on the same rows agree exactly.

Expected (confidence-based performance estimation): with calibrated probabilities p, each row is a
churner with probability p, so before any label the implied figures are expectations over those
Bernoulli labels: the churn rate is mean(p), the high tier's precision is the mean p of its rows,
its recall sum(p over high) / sum(p), and the AUC is the expected share of (churner, stayer) pairs
ranked right: sum over i != j of p_i (1 - p_j) [s_i > s_j] (ties half) over sum p_i (1 - p_j).
A gap between expected and realized figures says the calibration no longer holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training import metrics

HIGH = "high"


def _scores(probabilities: np.ndarray, tiers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns the probabilities as float64 and the mask of rows in the high tier."""
    return np.asarray(probabilities, dtype=np.float64), np.asarray(tiers) == HIGH


def realized(labels: np.ndarray, probabilities: np.ndarray, tiers: Sequence[str]) -> dict[str, float]:
    """Returns the realized figures of labelled snapshot rows: rows, churners, roc_auc, pr_auc,
    high_precision, high_recall (of the high tier), brier, observed_rate, predicted_rate (NaN where
    undefined, e.g. no churner or no high-tier row)."""
    y = np.asarray(labels, dtype=bool)
    p, high = _scores(probabilities, tiers)
    positives = int(y.sum())
    return {
        "rows": float(len(y)),
        "churners": float(positives),
        "roc_auc": metrics.roc_auc(y, p),
        "pr_auc": metrics.average_precision(y, p),
        "high_precision": float(y[high].mean()) if high.any() else float("nan"),
        "high_recall": float(y[high].sum() / positives) if positives else float("nan"),
        "brier": metrics.brier(y, p),
        "observed_rate": float(y.mean()) if len(y) else float("nan"),
        "predicted_rate": float(p.mean()) if len(p) else float("nan"),
    }


def expected_auc(probabilities: np.ndarray) -> float:
    """Returns the ROC-AUC the probabilities imply if they are calibrated (see the module doc);
    NaN for fewer than two rows."""
    p = np.sort(np.asarray(probabilities, dtype=np.float64))
    if len(p) < 2:
        return float("nan")
    stay = 1.0 - p
    # For each row i (as the churner): the stayer weight of rows scored strictly lower, plus half
    # of the tied rows other than i itself.
    unique, first, counts = np.unique(p, return_index=True, return_counts=True)
    below = np.concatenate([[0.0], np.cumsum(stay)])[first]  # sum of (1 - p) strictly below each value
    tied = counts * (1.0 - unique)
    right = float(np.sum(unique * counts * (below + 0.5 * (tied - (1.0 - unique)))))
    pairs = float(p.sum() * stay.sum() - np.sum(p * stay))
    return right / pairs if pairs > 0 else float("nan")


def expected(probabilities: np.ndarray, tiers: Sequence[str]) -> dict[str, float]:
    """Returns the figures calibrated probabilities imply before labels: rows, roc_auc,
    high_precision, high_recall, predicted_rate (see the module doc; NaN where undefined)."""
    p, high = _scores(probabilities, tiers)
    total = float(p.sum())
    return {
        "rows": float(len(p)),
        "roc_auc": expected_auc(p),
        "high_precision": float(p[high].mean()) if high.any() else float("nan"),
        "high_recall": float(p[high].sum() / total) if total > 0 else float("nan"),
        "predicted_rate": float(p.mean()) if len(p) else float("nan"),
    }
