"""Point-in-time training sets: observation points on a time grid, features as of each point,
and the churn label over the following horizon.

For a grid time t (epoch ms) a user is observed if they had an event in the `lookback` before t
(ts in [t - lookback, t]) and had not churned at or before t. The features are
`features.offline.compute` as of t (only events at or before t); the label is 1 if the user's
`Cancellation Confirmation` falls in (t, t + H] (only events after t). A point is labelled only
if its label window ends within the data (t + H <= the last event's ts); later points are kept
unlabelled (label null), e.g. for scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl

from core.errors import InvalidInputError
from events.schema import CHURN_PAGE
from features import offline, spec


@dataclass(frozen=True)
class GridConfig:
    """Where observation points fall: every `step_hours` from UTC midnight of the first event's
    day (the first grid time after the first event), users active within `lookback_days`."""

    horizon_days: int = 14
    step_hours: int = 24
    lookback_days: int = 28


class DataWindow(NamedTuple):
    """The span of the event log (epoch ms) and of the labelled observation times."""

    first_event_ms: int
    last_event_ms: int
    first_point_ms: int
    last_labelled_point_ms: int


def churn_times(events: pl.LazyFrame) -> pl.LazyFrame:
    """Returns (user_id, churn_ms): each churned user's first Cancellation Confirmation ts."""
    return events.filter(pl.col("page") == CHURN_PAGE).group_by("user_id").agg(pl.col("ts").min().alias("churn_ms"))


def observation_points(events: pl.LazyFrame, grid: GridConfig) -> tuple[pl.DataFrame, DataWindow]:
    """Returns the candidate points (user_id, as_of, churn_ms) and the data window.

    Candidates are (user, grid time) pairs with t after the user's first event, t within
    `lookback` of their last event, and the user not churned at or before t; the lookback
    test on the latest event at or before t happens in `build`, once features are known.

    Raises:
        InvalidInputError: the log is empty or shorter than one grid step.
    """
    step_ms = grid.step_hours * spec.HOUR_MS
    lookback_ms = grid.lookback_days * spec.DAY_MS
    users = (
        events.group_by("user_id")
        .agg(pl.col("ts").min().alias("first_ms"), pl.col("ts").max().alias("last_ms"))
        .join(churn_times(events), on="user_id", how="left")
        .collect()
        .sort("user_id")
    )
    if users.is_empty():
        msg = "the event log holds no logged-in event"
        raise InvalidInputError(msg)
    first_ms, last_ms = int(users["first_ms"].min()), int(users["last_ms"].max())  # type: ignore[arg-type]
    origin = first_ms // spec.DAY_MS * spec.DAY_MS
    first_point = origin + (first_ms - origin) // step_ms * step_ms + step_ms
    if first_point > last_ms:
        hours = (last_ms - first_ms) / spec.HOUR_MS
        msg = f"the event log spans {hours:.1f} h, less than one grid step of {grid.step_hours} h"
        raise InvalidInputError(msg)
    times = pl.DataFrame({"as_of": pl.int_range(first_point, last_ms + 1, step_ms, eager=True).cast(pl.Int64)})
    points = (
        users.join(times, how="cross")
        .filter(
            (pl.col("as_of") > pl.col("first_ms"))
            & (pl.col("as_of") <= pl.col("last_ms") + lookback_ms)
            & (pl.col("churn_ms").is_null() | (pl.col("churn_ms") > pl.col("as_of")))
        )
        .select("user_id", "as_of", "churn_ms")
        .sort("as_of", "user_id")
    )
    labelled_end = last_ms - grid.horizon_days * spec.DAY_MS
    last_labelled = first_point + (labelled_end - first_point) // step_ms * step_ms
    return points, DataWindow(first_ms, last_ms, first_point, last_labelled)


def build(events: pl.LazyFrame, grid: GridConfig) -> tuple[pl.DataFrame, DataWindow]:
    """Returns the training set and the data window: one row per observation point with
    user_id, as_of, `last_event_ms`, every `spec.MODEL_FEATURES` column and `label`
    (Int8 1/0; null where the label window runs past the end of the data), sorted by as_of, user_id.

    Raises:
        InvalidInputError: the log is empty, too short for the horizon, or has no churner
            in its labelled part.
    """
    events = events.cache()
    points, window = observation_points(events, grid)
    features = offline.compute(events, points.select("user_id", "as_of"))
    lookback_ms = grid.lookback_days * spec.DAY_MS
    horizon_ms = grid.horizon_days * spec.DAY_MS
    labelled = pl.col("as_of") + horizon_ms <= window.last_event_ms
    churns = pl.col("churn_ms").is_not_null() & (pl.col("churn_ms") <= pl.col("as_of") + horizon_ms)
    frame = (
        features.with_columns(points["churn_ms"])
        .filter(pl.col("last_event_ms").is_not_null() & (pl.col("last_event_ms") >= pl.col("as_of") - lookback_ms))
        .with_columns(pl.when(labelled).then(churns.cast(pl.Int8)).otherwise(None).alias("label"))
        .drop("churn_ms")
    )
    train_part = frame.filter(pl.col("label").is_not_null())
    if train_part.is_empty():
        days = (window.last_event_ms - window.first_event_ms) / spec.DAY_MS
        msg = f"the event log spans {days:.1f} days: too short to label a {grid.horizon_days}-day horizon"
        raise InvalidInputError(msg)
    if int(train_part["label"].sum()) == 0:
        msg = (
            f"no user churns ('{CHURN_PAGE}') within {grid.horizon_days} days of any labelled observation point:"
            " nothing to learn"
        )
        raise InvalidInputError(msg)
    return frame, window


def feature_matrix(frame: pl.DataFrame, features: tuple[str, ...] = spec.MODEL_FEATURES) -> np.ndarray:
    """Returns the rows' features as a C-ordered float64 matrix in `features` order (null -> NaN).

    Raises:
        InvalidInputError: a feature column is missing from `frame`.
    """
    missing = [name for name in features if name not in frame.columns]
    if missing:
        msg = f"feature column(s) {missing} missing from the frame"
        raise InvalidInputError(msg)
    selected = frame.select(pl.col(name).cast(pl.Float64) for name in features)
    return np.ascontiguousarray(selected.to_numpy(), dtype=np.float64)


def with_weights(frame: pl.DataFrame, period_hours: int = 24) -> pl.DataFrame:
    """Returns `frame` with a Float64 `weight` column: 1 / the user's rows in the same
    `period_hours` period (from UTC midnight), so that each user-period counts once in
    training however many grid points it holds (a grid finer than the period gives an
    observed user several rows per period; one a user joins or leaves in gets fewer)."""
    period = pl.col("as_of") // (period_hours * spec.HOUR_MS)
    return frame.with_columns((1.0 / pl.len().over("user_id", period)).cast(pl.Float64).alias("weight"))
