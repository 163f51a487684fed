"""Feature and score drift of the live stream against the champion's reference distributions.

PSI uses the reference's FIXED bins (`training.reference`: interior edges at the reference
deciles, plus one bin for missing values), so live and reference shares are always compared
bin for bin; KS is the two-sample test (scipy `ks_2samp`) of the live values against the
reference's raw sample. Thresholds follow the usual PSI reading: below 0.1 stable, 0.1-0.25
moderate shift (warn), above 0.25 significant shift (alert).

`DriftWindow` holds the latest row of each of the last `size` distinct users seen (a numpy ring
buffer keyed by user), because the reference is one row per active user per observation time:
keeping every scored row instead would weight each user by how often they are scored and
report the heaviest listeners as "drift". Request-time features are recomputed as of the
window's watermark at `compute` time (the stream scores as of each user's latest event, where
they are 0 by construction), and the score is recomputed with them when a model is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Status = Literal["ok", "warn", "alert"]
# An empty bin on either side would make PSI infinite; a share this small counts as "almost
# never" without letting one empty bin dominate the sum.
EPSILON = 1e-4


@dataclass(frozen=True)
class Thresholds:
    """PSI levels for the per-feature status (see the module doc)."""

    warn: float = 0.1
    alert: float = 0.25

    def status(self, psi: float) -> Status:
        """Returns "alert" at or above `alert`, "warn" at or above `warn`, else "ok" (NaN is "ok")."""
        if psi >= self.alert:
            return "alert"
        return "warn" if psi >= self.warn else "ok"


def reference_shares(distribution: dict[str, Any]) -> np.ndarray:
    """Returns the reference's share per fixed bin, the missing (NaN) share last; sums to 1."""
    edges = distribution.get("edges") or []
    proportions = np.asarray(distribution.get("proportions") or [0.0] * (len(edges) + 1), dtype=np.float64)
    missing = float(distribution.get("missing") or 0.0)
    return np.append(proportions * (1.0 - missing), missing)


def live_shares(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Returns the share of `values` in each bin (-inf, e1], ..., (ek, inf), then the NaN share.

    The bins are `training.reference.proportions_in`'s, so live and reference agree on edges.
    """
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return np.zeros(len(edges) + 2)
    missing = np.isnan(values)
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values[~missing], side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(np.float64)
    return np.append(counts, missing.sum()) / len(values)


def psi(expected: np.ndarray, actual: np.ndarray, epsilon: float = EPSILON) -> float:
    """Returns the population stability index sum((a - e) * ln(a / e)) over matching bins.

    Shares below `epsilon` are raised to it on both sides (an empty bin would be infinite).
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def ks(reference_sample: Sequence[float], values: np.ndarray) -> tuple[float, float]:
    """Returns (KS statistic, p-value) of the non-missing `values` against the reference sample;
    (nan, nan) when either side is empty."""
    from scipy.stats import ks_2samp

    present = np.asarray(values, dtype=np.float64)
    present = present[~np.isnan(present)]
    if not len(present) or not len(reference_sample):
        return float("nan"), float("nan")
    # The asymptotic p-value: scipy's default tries the exact one for samples up to 10,000,
    # which took ~1 s for the ~46 columns of one report in the scorer's loop (a freshness stall
    # every report), for p-values that differ in the third decimal at these sizes.
    result = ks_2samp(np.asarray(reference_sample, dtype=np.float64), present, method="asymp")
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class Drift:
    """Drift of one column: PSI on the fixed bins, KS against the sample, and the PSI status."""

    psi: float
    ks_statistic: float
    ks_pvalue: float
    status: Status


def column_drift(distribution: dict[str, Any], values: np.ndarray, thresholds: Thresholds) -> Drift:
    """Returns the drift of `values` (NaN = missing) against one reference distribution."""
    value = psi(reference_shares(distribution), live_shares(values, distribution.get("edges") or []))
    statistic, pvalue = ks(distribution.get("sample") or [], values)
    return Drift(value, statistic, pvalue, thresholds.status(value))


@dataclass(frozen=True)
class DriftReport:
    """One drift computation: per feature and for the score, over `rows` window rows."""

    computed_at: float  # epoch seconds (wall clock)
    rows: int
    features: dict[str, Drift]
    score: Drift | None  # None when the window holds no scores

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict (NaN becomes None)."""

        def clean(d: Drift) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(d).items()}

        return {
            "computed_at": self.computed_at,
            "rows": self.rows,
            "features": {name: clean(d) for name, d in self.features.items()},
            "score": None if self.score is None else clean(self.score),
        }


class DriftWindow:
    """The latest feature row and score of each of the last `size` distinct users (bounded memory).

    `add` is called once per scored batch with the matrix and probabilities the scorer already
    has; `compute` builds a `DriftReport`. Not thread-safe: one scorer loop owns it.
    """

    def __init__(
        self,
        features: Sequence[str],
        size: int = 5000,
        *,
        request_features: dict[str, Callable[[np.ndarray, int], np.ndarray]] | None = None,
        max_age_ms: int = 28 * 86_400_000,
    ) -> None:
        """`request_features` maps a request-time feature to f(last_event_ms, watermark_ms) -> values;
        users whose latest event is older than `max_age_ms` before the watermark are left out, as
        training leaves out users inactive for longer than its lookback."""
        if size < 1:
            msg = f"drift window size must be at least 1, got {size}"
            raise ValueError(msg)
        self.features = tuple(features)
        self.size = size
        self.request_features = request_features or {}
        self.max_age_ms = max_age_ms
        self._matrix = np.full((size, len(self.features)), np.nan)
        self._scores = np.full(size, np.nan)
        self._last_event_ms = np.zeros(size, dtype=np.int64)
        self._users: list[str | None] = [None] * size
        self._slot: dict[str, int] = {}
        self._next = 0  # the slot a new user takes (the oldest one once full)

    def __len__(self) -> int:
        return len(self._slot)

    def add(
        self, users: Sequence[str], matrix: np.ndarray, scores: np.ndarray | None, last_event_ms: Sequence[int]
    ) -> None:
        """Records each user's latest row; a new user evicts the least recently added one."""
        for i, user in enumerate(users):
            slot = self._slot.get(user)
            if slot is None:
                slot = self._next
                self._next = (self._next + 1) % self.size
                evicted = self._users[slot]
                if evicted is not None:
                    del self._slot[evicted]
                self._users[slot] = user
                self._slot[user] = slot
            self._matrix[slot] = matrix[i]
            self._scores[slot] = np.nan if scores is None else scores[i]
            self._last_event_ms[slot] = last_event_ms[i]

    def discard(self, users: Sequence[str]) -> None:
        """Drops users who left (e.g. churned): the reference only holds users still active."""
        for user in users:
            slot = self._slot.pop(user, None)
            if slot is not None:
                self._users[slot] = None

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns copies of (feature matrix, scores) of the users in the window active within
        `max_age_ms` of the watermark (its latest event), request-time features recomputed as of
        the watermark."""
        used = np.fromiter(self._slot.values(), dtype=np.int64, count=len(self._slot))
        if len(used):
            watermark = int(self._last_event_ms[used].max())
            used = used[self._last_event_ms[used] >= watermark - self.max_age_ms]
        matrix = self._matrix[used].copy()
        if len(used):
            last = self._last_event_ms[used]
            for name, recompute in self.request_features.items():
                matrix[:, self.features.index(name)] = recompute(last, watermark)
        return matrix, self._scores[used].copy()

    def compute(
        self,
        reference: dict[str, Any],
        thresholds: Thresholds,
        *,
        now: float,
        rescore: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> DriftReport:
        """Returns the drift of the window against `reference` ({"features": {...}, "score": {...}},
        `training.reference.references`). Features absent from the reference are skipped.

        `rescore` (the model's predict) recomputes scores as of the watermark, so they are
        comparable with the reference's scores at observation times; without it the scores
        recorded by `add` are used.
        """
        matrix, scores = self.rows()
        if rescore is not None and len(matrix):
            scores = np.asarray(rescore(matrix), dtype=np.float64)
        features = {
            name: column_drift(reference["features"][name], matrix[:, i], thresholds)
            for i, name in enumerate(self.features)
            if name in reference.get("features", {})
        }
        scored = scores[~np.isnan(scores)]
        score = column_drift(reference["score"], scored, thresholds) if len(scored) and "score" in reference else None
        return DriftReport(now, len(matrix), features, score)


def seconds_since(last_event_ms: np.ndarray, watermark_ms: int) -> np.ndarray:
    """Returns the seconds from each latest event to the watermark (`seconds_since_last_event`)."""
    return (watermark_ms - last_event_ms.astype(np.float64)) / 1000.0
