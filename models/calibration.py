"""Applying a fitted probability calibration (fitting lives in `training.calibration`).

A calibration is plain JSON (no pickle) mapping the booster's raw probability to a calibrated one:
- `none`: identity;
- `platt`: sigmoid(a * logit(p) + b), two numbers;
- `isotonic`: breakpoints `x` (raw probabilities, increasing) and `y` (calibrated), applied with
  linear interpolation between breakpoints and clamped beyond them, so it stays monotone and
  ranks are kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

EPS = 1e-6


def apply(calibration: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    """Returns calibrated probabilities for raw booster probabilities.

    Raises:
        ValueError: the calibration's method is unknown.
    """
    method = calibration.get("method", "none")
    raw = np.asarray(raw, dtype=np.float64)
    if method == "none":
        return raw
    if method == "platt":
        logit = special.logit(np.clip(raw, EPS, 1 - EPS))
        return np.asarray(special.expit(calibration["a"] * logit + calibration["b"]))
    if method == "isotonic":
        return np.interp(raw, np.asarray(calibration["x"]), np.asarray(calibration["y"]))
    msg = f"unknown calibration method {method!r}; expected none, platt or isotonic"
    raise ValueError(msg)
