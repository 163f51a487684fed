"""Reference distributions for drift monitoring (PSI on fixed bins, KS on a raw sample).

For each feature and for the score: interior bin edges at the reference's deciles (duplicates
removed, so a mostly-zero count gets few bins), the share of rows in each bin
(-inf, e1], (e1, e2], ..., (ek, inf), the share of missing values (NaN), and a seeded sample
of at most `sample_size` non-missing raw values for a two-sample KS test.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitoring.drift import segment_masks


def distribution(values: np.ndarray, bins: int = 10, sample_size: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Returns {edges, proportions, missing, count, sample} of `values` (see the module doc)."""
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    missing = float(1 - len(present) / len(values)) if len(values) else 0.0
    if not len(present):
        return {"edges": [], "proportions": [], "missing": missing, "count": len(values), "sample": []}
    edges = np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1]))
    proportions = proportions_in(present, edges)
    rng = np.random.default_rng(seed)
    sample = present if len(present) <= sample_size else rng.choice(present, sample_size, replace=False)
    return {
        "edges": edges.tolist(),
        "proportions": proportions.tolist(),
        "missing": missing,
        "count": len(values),
        "sample": np.sort(sample).tolist(),
    }


def proportions_in(values: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """Returns the share of non-missing `values` in each bin (-inf, e1], ..., (ek, inf)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    counts = np.bincount(index, minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def references(matrix: np.ndarray, features: tuple[str, ...], scores: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Returns {"features": {name: distribution}, "score": distribution, "segments": {segment:
    {"count", "features", "score"}}} for the rows of `matrix`; the segments are
    `monitoring.drift.segment_masks` (level, tenure band), so drift per segment compares like
    with like."""

    def of(rows: np.ndarray, values: np.ndarray) -> dict[str, Any]:
        return {
            "features": {name: distribution(rows[:, i], seed=seed + i) for i, name in enumerate(features)},
            "score": distribution(values, seed=seed),
        }

    out = of(matrix, scores)
    out["segments"] = {
        name: {"count": int(mask.sum()), **of(matrix[mask], scores[mask])}
        for name, mask in segment_masks(matrix, features).items()
    }
    return out
