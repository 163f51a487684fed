"""Evaluation on the test period: metrics, and ROC / PR / calibration / importance plots (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training import metrics


def evaluate(labels: np.ndarray, probabilities: np.ndarray, oracle: np.ndarray | None = None) -> dict[str, Any]:
    """Returns the test metrics: roc_auc, pr_auc, precision/recall/lift in the top 10%, brier,
    log_loss, base rate, row and positive counts, the calibration curve, and, given the
    oracle's probabilities for the same rows (NaN where unknown), oracle_roc_auc and
    auc_vs_oracle, both on the rows the oracle knows."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(probabilities, dtype=np.float64)
    top = metrics.top_fraction(y, p, 0.1)
    out: dict[str, Any] = {
        "roc_auc": metrics.roc_auc(y, p),
        "pr_auc": metrics.average_precision(y, p),
        "precision_top10": top["precision"],
        "recall_top10": top["recall"],
        "lift_top10": top["lift"],
        "brier": metrics.brier(y, p),
        "log_loss": metrics.log_loss(y, p),
        "base_rate": float(y.mean()) if len(y) else float("nan"),
        "rows": len(y),
        "positives": int(y.sum()),
        "calibration_curve": metrics.calibration_curve(y, p),
    }
    if oracle is not None:
        known = ~np.isnan(oracle)
        out["oracle_rows"] = int(known.sum())
        out["oracle_roc_auc"] = metrics.roc_auc(y[known], oracle[known])
        out["oracle_pr_auc"] = metrics.average_precision(y[known], oracle[known])
        out["model_roc_auc_on_oracle_rows"] = metrics.roc_auc(y[known], p[known])
        out["auc_vs_oracle"] = out["model_roc_auc_on_oracle_rows"] / out["oracle_roc_auc"]
    return out


def save_plots(
    directory: Path,
    labels: np.ndarray,
    probabilities: np.ndarray,
    importance: dict[str, float],
    oracle: np.ndarray | None = None,
) -> list[Path]:
    """Writes roc.png, pr.png, calibration.png and importance.png into `directory`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    y = np.asarray(labels, dtype=bool)
    curves = [("model", probabilities)]
    if oracle is not None and not np.isnan(oracle).all():
        known = ~np.isnan(oracle)
        curves.append(("oracle", np.where(known, oracle, 0.0)))
    paths = []

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, scores in curves:
        fpr, tpr = metrics.roc_curve(y, scores)
        ax.plot(fpr, tpr, label=f"{name} AUC {metrics.roc_auc(y, scores):.3f}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    ax.legend(loc="lower right")
    paths.append(_save(fig, directory / "roc.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, scores in curves:
        precision, recall = metrics.precision_recall_curve(y, scores)
        ax.step(recall, precision, where="post", label=f"{name} AP {metrics.average_precision(y, scores):.3f}")
    ax.axhline(float(y.mean()), ls=":", c="grey", label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)")
    ax.legend(loc="upper right")
    paths.append(_save(fig, directory / "pr.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    curve = metrics.calibration_curve(y, probabilities, bins=10)
    top = max(max(curve["predicted"], default=0.0), max(curve["observed"], default=0.0), 1e-3)
    ax.plot([0, top], [0, top], ls=":", c="grey")
    ax.plot(curve["predicted"], curve["observed"], marker="o")
    ax.set(xlabel="mean predicted probability", ylabel="observed churn rate", title="Calibration (test, deciles)")
    paths.append(_save(fig, directory / "calibration.png"))

    ranked = sorted(importance.items(), key=lambda kv: kv[1])[-20:]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.barh([name for name, _ in ranked], [value for _, value in ranked])
    ax.set(xlabel="total gain", title="Feature importance (top 20)")
    paths.append(_save(fig, directory / "importance.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
