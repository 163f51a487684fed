"""The simulated listeners: who they are, when they registered, and their stable habits and tastes.

Habits and tastes are per-user multipliers independent of the hidden state, so two equally happy
users behave differently and a model has to read changes, not levels alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.timeutil import DAY_MS
from sim.catalog import FIRST_NAMES_F, FIRST_NAMES_M, LAST_NAMES, LOCATIONS, USER_AGENTS

FIRST_NAMES = FIRST_NAMES_F + FIRST_NAMES_M
PAID_SHARE_EXISTING, PAID_SHARE_NEW = 0.55, 0.05  # newcomers start on the free tier
TENURE_MEDIAN_DAYS = 150.0  # existing users registered months to years before the window


@dataclass(slots=True)
class Population:
    """One entry per user (row i is user id str(i + 1)): registration, level, habits, tastes, identity."""

    user_ids: np.ndarray
    registration_ms: np.ndarray
    is_new: np.ndarray
    paid: np.ndarray
    utc_offset_h: np.ndarray
    peak_hour: np.ndarray
    weekend: np.ndarray
    gap_days: np.ndarray
    actions: np.ndarray
    upgrade: np.ndarray
    tastes: dict[str, np.ndarray]
    female: np.ndarray
    first_name: np.ndarray
    last_name: np.ndarray
    location: np.ndarray
    agent: np.ndarray


def _weighted(weights: list[float], size: int, rng: np.random.Generator) -> np.ndarray:
    p = np.asarray(weights, dtype=float)
    return rng.choice(len(p), size=size, p=p / p.sum())


def build_population(
    users: int, days: int, start_ms: int, new_user_share: float, rng: np.random.Generator
) -> Population:
    """Returns `users` listeners: a `new_user_share` registers during the window, the rest before it."""
    is_new = rng.random(users) < new_user_share
    tenure_days = np.clip(rng.lognormal(np.log(TENURE_MEDIAN_DAYS), 0.8, users), 1.0, 1500.0)
    joined = np.where(is_new, start_ms + rng.random(users) * days * DAY_MS, start_ms - tenure_days * DAY_MS)
    paid = rng.random(users) < np.where(is_new, PAID_SHARE_NEW, PAID_SHARE_EXISTING)
    female = rng.random(users) < 0.5
    first_f = rng.integers(0, len(FIRST_NAMES_F), users)
    first_m = len(FIRST_NAMES_F) + rng.integers(0, len(FIRST_NAMES_M), users)
    location = _weighted([weight for _, _, weight in LOCATIONS], users, rng)

    def lognormal(median: float, sigma: float) -> np.ndarray:
        return rng.lognormal(np.log(median), sigma, users)

    return Population(
        user_ids=np.array([str(i + 1) for i in range(users)], dtype=object),
        registration_ms=(joined // 1000 * 1000).astype(np.int64),
        is_new=is_new,
        paid=paid,
        utc_offset_h=np.array([offset for _, offset, _ in LOCATIONS], dtype=np.int64)[location],
        peak_hour=rng.normal(19.0, 3.0, users) % 24,  # evenings, with early birds and night owls
        weekend=lognormal(0.9, 0.3),  # relative appetite on weekends
        gap_days=lognormal(1.5, 0.7),  # median time between sessions
        actions=lognormal(40.0, 0.45),  # mean page actions per session
        upgrade=lognormal(1.0, 0.5),
        tastes={name: lognormal(1.0, 0.45) for name in ("thumbs", "playlist", "social", "errors", "ad_quit")},
        female=female,
        first_name=np.where(female, first_f, first_m),
        last_name=rng.integers(0, len(LAST_NAMES), users),
        location=location,
        agent=_weighted([weight for _, weight in USER_AGENTS], users, rng),
    )
