"""Feature and score drift of the live stream against the champion's reference distributions.

PSI uses the reference's FIXED bins (`training.reference`: interior edges at the reference
deciles, plus one bin for missing values), so live and reference shares are always compared
bin for bin; KS is the two-sample test (scipy `ks_2samp`) of the live values against the
reference's raw sample. Thresholds follow the usual PSI reading: below 0.1 stable, 0.1-0.25
moderate shift (warn), above 0.25 significant shift (alert).

What is compared is a daily snapshot (`stream.snapshot`): at each UTC midnight of event time,
every user active within the lookback, their row as of that instant, scored by the champion:
exactly the population and the rows the reference was built from (training's observation
points), so with no drift the two differ by sampling noise only. A window of the users the
stream scored most recently would not: it holds the most active users, with recency near zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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


def column_drift(
    distribution: dict[str, Any], values: np.ndarray, thresholds: Thresholds, *, with_ks: bool = True
) -> Drift:
    """Returns the drift of `values` (NaN = missing) against one reference distribution (KS left
    NaN without `with_ks`)."""
    value = psi(reference_shares(distribution), live_shares(values, distribution.get("edges") or []))
    statistic, pvalue = ks(distribution.get("sample") or [], values) if with_ks else (float("nan"), float("nan"))
    return Drift(value, statistic, pvalue, thresholds.status(value))


# Segments judged apart (bounded label values): the level and a tenure band, from the model's
# own inputs, so a snapshot and the reference are split by the same rule.
TENURE_BANDS = (
    ("tenure_under_30d", 0.0, 30.0),
    ("tenure_30_to_180d", 30.0, 180.0),
    ("tenure_180d_plus", 180.0, np.inf),
)
SEGMENTS = ("level_free", "level_paid", *(name for name, _, _ in TENURE_BANDS))
# The column a segment is cut on: within the segment its distribution says only where the cut
# falls (a tenure band's tenures age day by day), so it is judged overall, not per segment.
SEGMENT_COLUMN = {"level_free": "level_paid", "level_paid": "level_paid"} | {
    name: "days_since_registration" for name, _, _ in TENURE_BANDS
}


def segment_masks(matrix: np.ndarray, features: Sequence[str]) -> dict[str, np.ndarray]:
    """Returns {segment: row mask} for `SEGMENTS`: level from `level_paid`, tenure band from
    `days_since_registration` (rows without a registration are in no band). A segment whose
    column is not among `features` is left out."""
    out: dict[str, np.ndarray] = {}
    if "level_paid" in features:
        paid = matrix[:, list(features).index("level_paid")]
        out["level_free"] = paid == 0
        out["level_paid"] = paid == 1
    if "days_since_registration" in features:
        days = matrix[:, list(features).index("days_since_registration")]
        for name, low, high in TENURE_BANDS:
            out[name] = (days >= low) & (days < high)
    return out


@dataclass(frozen=True)
class SegmentDrift:
    """Drift of one segment. `judged` is False when the segment holds fewer than the minimum
    rows in the snapshot or the reference: PSI over ten bins of a few dozen rows is mostly
    sampling noise (its expected value under no drift is about bins / rows), so such a segment
    is reported but never given a status above "ok"."""

    rows: int
    reference_rows: int
    judged: bool
    features: dict[str, Drift]
    score: Drift | None


@dataclass(frozen=True)
class DriftReport:
    """One drift computation: per feature and for the score over `rows` snapshot rows, and the
    same per segment; `as_of_ms` is the observation instant of the snapshot (event time)."""

    computed_at: float  # epoch seconds (wall clock)
    rows: int
    features: dict[str, Drift]
    score: Drift | None  # None when there are no scores
    as_of_ms: int | None = None
    segments: dict[str, SegmentDrift] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict (NaN becomes None)."""

        def clean(d: Drift) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(d).items()}

        return {
            "computed_at": self.computed_at,
            "as_of_ms": self.as_of_ms,
            "rows": self.rows,
            "features": {name: clean(d) for name, d in self.features.items()},
            "score": None if self.score is None else clean(self.score),
            "segments": {
                name: {
                    "rows": seg.rows,
                    "reference_rows": seg.reference_rows,
                    "judged": seg.judged,
                    "features": {f: clean(d) for f, d in seg.features.items()},
                    "score": None if seg.score is None else clean(seg.score),
                }
                for name, seg in self.segments.items()
            },
        }


def _columns(
    reference: dict[str, Any],
    features: Sequence[str],
    matrix: np.ndarray,
    scores: np.ndarray,
    thresholds: Thresholds,
    *,
    with_ks: bool = True,
) -> tuple[dict[str, Drift], Drift | None]:
    drifts = {
        name: column_drift(reference["features"][name], matrix[:, i], thresholds, with_ks=with_ks)
        for i, name in enumerate(features)
        if name in reference.get("features", {})
    }
    scored = scores[~np.isnan(scores)]
    score = (
        column_drift(reference["score"], scored, thresholds, with_ks=with_ks)
        if len(scored) and "score" in reference
        else None
    )
    return drifts, score


def snapshot_drift(
    reference: dict[str, Any],
    features: Sequence[str],
    matrix: np.ndarray,
    scores: np.ndarray,
    thresholds: Thresholds,
    *,
    now: float,
    as_of_ms: int | None = None,
    min_segment_rows: int = 500,
) -> DriftReport:
    """Returns the drift of a snapshot (rows of `features`, one per user, and their scores)
    against `reference` ({"features", "score", "segments"}, `training.reference.references`).

    Features absent from the reference are skipped, and so is the column a segment is cut on
    within that segment (`SEGMENT_COLUMN`). Segments are measured only when the reference has
    them (models trained before segments existed have none) and judged only when both sides
    hold at least `min_segment_rows` rows (see `SegmentDrift`).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    overall, score = _columns(reference, features, matrix, scores, thresholds)
    segments: dict[str, SegmentDrift] = {}
    references = reference.get("segments") or {}
    for name, mask in segment_masks(matrix, features).items():
        seg_reference = references.get(name)
        if seg_reference is None:
            continue
        rows, reference_rows = int(mask.sum()), int(seg_reference.get("count") or 0)
        judged = rows >= min_segment_rows and reference_rows >= min_segment_rows
        # An unjudged segment is still measured (shown), with every status forced to "ok".
        seg_thresholds = thresholds if judged else Thresholds(np.inf, np.inf)
        # PSI only: the status is PSI's, and KS per segment would double the report's time.
        seg_features, seg_score = _columns(
            seg_reference, features, matrix[mask], scores[mask], seg_thresholds, with_ks=False
        )
        seg_features.pop(SEGMENT_COLUMN[name], None)
        segments[name] = SegmentDrift(rows, reference_rows, judged, seg_features, seg_score)
    return DriftReport(now, len(matrix), overall, score, as_of_ms, segments)
