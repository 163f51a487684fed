"""The oracle: the best achievable churn probability given the hidden state, and its ROC-AUC.

P(churn in (t, t+H] | d at t) follows from the known dynamics alone: the hidden state is discretised
on a fine grid, its one-day transition kernel is built exactly (a Gaussian step, mixed with a
Gaussian plus exponential shock), and the expected survival over the horizon is computed backwards
through the kernel. The realised future path is never used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from core.timeutil import DAY_MS
from sim.ground_truth import Dynamics, GroundTruth, load_truth
from training.metrics import roc_auc

_GRID_STEP = 0.02
_GRID_LO, _GRID_HI = -5.0, 8.0  # hazards beyond 8 exceed 30/day: survival is ~0 either way
_FRACTIONS = np.linspace(0.0, 1.0, 97)  # 15-minute steps of the time of day of an observation


def _transition_matrix(dynamics: Dynamics, grid: np.ndarray) -> np.ndarray:
    """Returns T[i, j] = P(tomorrow's state is in grid cell j | today's state is grid[i])."""
    edges = np.concatenate([[-np.inf], (grid[1:] + grid[:-1]) / 2, [np.inf]])
    centre = dynamics.rho * grid + (1 - dynamics.rho) * dynamics.mean
    sd = dynamics.noise_sd
    calm = stats.norm.cdf(edges[None, :], loc=centre[:, None], scale=sd)
    # A Gaussian step plus an Exp(shock_mean) jump is exponentially modified Gaussian.
    shock = stats.exponnorm.cdf(edges[None, :], dynamics.shock_mean / sd, loc=centre[:, None], scale=sd)
    cdf = (1 - dynamics.shock_rate) * calm + dynamics.shock_rate * shock
    return np.diff(cdf, axis=1)


def _survival_table(dynamics: Dynamics, horizon_days: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (grid, Q) where Q[i, f] = E[survival of the horizon's remaining days | state grid[i] today].

    For an observation at fraction f of day k, the horizon covers the rest of day k (hazard known),
    days k+1 .. k+H-1 in full and fraction f of day k+H; Q holds the expectation over everything
    after day k, so P(survive) = exp(-h(d) * (1 - f)) * Q(d, f).
    """
    grid = np.arange(_GRID_LO, _GRID_HI + _GRID_STEP / 2, _GRID_STEP)
    kernel = _transition_matrix(dynamics, grid)
    day_survival = np.exp(-dynamics.hazard(grid))
    last_day = np.exp(-dynamics.hazard(grid)[:, None] * _FRACTIONS[None, :])
    ahead = last_day
    for _ in range(horizon_days - 1):
        ahead = day_survival[:, None] * (kernel @ ahead)
    return grid, kernel @ ahead


def _bilinear(table: np.ndarray, grid: np.ndarray, state: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    x = np.clip((state - grid[0]) / _GRID_STEP, 0, len(grid) - 1.000001)
    y = np.clip(fraction * (len(_FRACTIONS) - 1), 0, len(_FRACTIONS) - 1.000001)
    i, j = x.astype(np.int64), y.astype(np.int64)
    wx, wy = x - i, y - j
    return (
        table[i, j] * (1 - wx) * (1 - wy)
        + table[i + 1, j] * wx * (1 - wy)
        + table[i, j + 1] * (1 - wx) * wy
        + table[i + 1, j + 1] * wx * wy
    )


def oracle_at(truth: GroundTruth, user_index: np.ndarray, ts_ms: np.ndarray, horizon_days: int) -> np.ndarray:
    """Returns P(churn in (t, t+H] | hidden state at t) for users by row index and times t (epoch ms).

    NaN where the state is unknown: t outside the simulated days, before registration, after churn.

    Raises:
        ValueError: `horizon_days` is not a positive integer.
    """
    if int(horizon_days) != horizon_days or horizon_days < 1:
        msg = f"horizon_days must be a positive integer, got {horizon_days!r}"
        raise ValueError(msg)
    user_index = np.asarray(user_index, dtype=np.int64)
    offset = np.asarray(ts_ms, dtype=np.int64) - truth.start_ms
    day, fraction = offset // DAY_MS, (offset % DAY_MS) / DAY_MS
    inside = (day >= 0) & (day < truth.days)
    state = np.full(len(user_index), np.nan)
    state[inside] = truth.state[user_index[inside], day[inside]]
    churned = truth.churn_ms[user_index] >= 0
    state[churned & (np.asarray(ts_ms) >= truth.churn_ms[user_index])] = np.nan
    state[np.asarray(ts_ms) < truth.registration_ms[user_index]] = np.nan
    grid, table = _survival_table(truth.dynamics, int(horizon_days))
    known = ~np.isnan(state)
    survive = np.full(len(state), np.nan)
    today = np.exp(-truth.dynamics.hazard(state[known]) * (1 - fraction[known]))
    survive[known] = today * _bilinear(table, grid, state[known], fraction[known])
    return np.clip(1 - survive, 0.0, 1.0)


def oracle_probability(truth: GroundTruth, points: Sequence[tuple[str, int]], horizon_days: int) -> np.ndarray:
    """Returns the oracle P(churn in (t, t+H] | hidden state at t) for each (user_id, ts_ms) point.

    NaN where the state is unknown (see `oracle_at`).

    Raises:
        KeyError: a user id is not in the truth.
        ValueError: `horizon_days` is not a positive integer.
    """
    row = {str(user): i for i, user in enumerate(truth.user_ids)}
    user_index = np.fromiter((row[str(user)] for user, _ in points), dtype=np.int64, count=len(points))
    ts_ms = np.fromiter((int(ts) for _, ts in points), dtype=np.int64, count=len(points))
    return oracle_at(truth, user_index, ts_ms, horizon_days)


def daily_points(truth: GroundTruth, horizon_days: int = 14, active_days: int = 28) -> dict[str, np.ndarray]:
    """Returns the daily observation grid: user rows, ts (each UTC midnight) and churn labels.

    A point is a user registered and not yet churned at the midnight t, with a logged-in event in
    the previous `active_days` days, whose label window (t, t+H] ends within the simulated data.
    """
    users, times, labels = [], [], []
    active = np.cumsum(np.concatenate([np.zeros((len(truth.user_ids), 1), np.int64), truth.events_per_day], 1), 1)
    for day in range(1, truth.days - horizon_days + 1):
        t = truth.start_ms + day * DAY_MS
        recent = (active[:, day] - active[:, max(day - active_days, 0)]) > 0
        alive = (truth.churn_ms < 0) | (truth.churn_ms > t)
        rows = np.flatnonzero(recent & alive & (truth.registration_ms <= t))
        churn = truth.churn_ms[rows]
        users.append(rows)
        times.append(np.full(len(rows), t, dtype=np.int64))
        labels.append((churn > t) & (churn <= t + horizon_days * DAY_MS))
    return {"user_index": np.concatenate(users), "ts_ms": np.concatenate(times), "label": np.concatenate(labels)}


def oracle_report(truth: GroundTruth, horizon_days: int = 14, active_days: int = 28) -> dict[str, Any]:
    """Returns the oracle's ROC-AUC on the daily grid (see `daily_points`) and a summary of the data."""
    points = daily_points(truth, horizon_days, active_days)
    probability = oracle_at(truth, points["user_index"], points["ts_ms"], horizon_days)
    churned = truth.churn_ms >= 0
    return {
        "horizon_days": horizon_days,
        "users": len(truth.user_ids),
        "churned_users": int(churned.sum()),
        "churn_rate": float(churned.mean()) if len(churned) else float("nan"),
        "points": len(probability),
        "positive_rate": float(points["label"].mean()) if len(probability) else float("nan"),
        "mean_oracle_probability": float(np.mean(probability)) if len(probability) else float("nan"),
        "oracle_auc": roc_auc(points["label"], probability),
    }


def oracle_for(truth_path: Path) -> Callable[[pl.DataFrame, int], np.ndarray]:
    """Returns the oracle of the simulation whose ground truth is at `truth_path`, as
    `training.pipeline.TrainOptions.oracle` takes it: rows (user_id, as_of ms) and the horizon
    in days -> the true P(churn) of each row (NaN for users the simulation does not know).

    Raises:
        InvalidInputError: the file is not a simulator ground truth.
    """
    truth = load_truth(truth_path)
    row = {str(user): i for i, user in enumerate(truth.user_ids)}

    def probabilities(points: pl.DataFrame, horizon_days: int) -> np.ndarray:
        index = np.array([row.get(user, -1) for user in points["user_id"].to_list()], dtype=np.int64)
        out = np.full(points.height, np.nan)
        known = index >= 0
        out[known] = oracle_at(truth, index[known], points["as_of"].to_numpy()[known], horizon_days)
        return out

    return probabilities
