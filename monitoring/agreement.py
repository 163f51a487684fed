"""Agreement between the served model's scores and the shadow model's on the same users (issue
#22, shadow): the share of users both put in the same tier, the Spearman rank correlation of the
probabilities and the mean |delta p|. A challenger that agrees on all three changes little when
promoted; one that ranks users differently changes who lands on the at-risk list."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Agreement:
    """Agreement over `rows` users; `spearman` is NaN under 2 rows or when either side is constant
    (a rank correlation is undefined there)."""

    rows: int
    same_tier: float  # share of users in the same tier (NaN without rows)
    spearman: float
    mean_abs_delta: float  # mean |p_served - p_shadow| (NaN without rows)

    def figures(self) -> dict[str, float]:
        """Returns {same_tier, spearman, mean_abs_delta}: the `metric` labels of the agreement gauge."""
        return {"same_tier": self.same_tier, "spearman": self.spearman, "mean_abs_delta": self.mean_abs_delta}


def agreement(
    served: np.ndarray, shadow: np.ndarray, served_tiers: Sequence[str], shadow_tiers: Sequence[str]
) -> Agreement:
    """Returns the agreement of two models' probabilities and tiers, row i of each side being the
    same user.

    Raises:
        ValueError: the four sequences do not have the same length.
    """
    served = np.asarray(served, dtype=np.float64)
    shadow = np.asarray(shadow, dtype=np.float64)
    rows = len(served)
    if not (len(shadow) == len(served_tiers) == len(shadow_tiers) == rows):
        sizes = f"{rows}, {len(shadow)}, {len(served_tiers)}, {len(shadow_tiers)}"
        msg = f"agreement needs one row per user on each side, got {sizes}"
        raise ValueError(msg)
    if rows == 0:
        return Agreement(0, math.nan, math.nan, math.nan)
    same = sum(a == b for a, b in zip(served_tiers, shadow_tiers, strict=True)) / rows
    return Agreement(rows, float(same), spearman(served, shadow), float(np.mean(np.abs(served - shadow))))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Returns the Spearman rank correlation of `a` and `b` (ties get their mean rank), NaN under
    2 rows or when either side is constant."""
    from scipy.stats import spearmanr  # scipy's import costs ~0.3 s: only where a figure is computed

    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(spearmanr(a, b).statistic)
