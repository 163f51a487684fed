"""Batch scoring of every known user as of a time, with a loaded model."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from core.errors import InvalidInputError
from core.timeutil import DAY_MS
from features import offline
from models.artifact import ChurnModel
from training.dataset import churn_times, feature_matrix


def score_users(
    model: ChurnModel, events: pl.LazyFrame, as_of_ms: int, version: str, *, active_days: int | None = None
) -> pl.DataFrame:
    """Returns one row per known user as of `as_of_ms` (epoch ms): user_id, churn_probability,
    risk_tier, model_version, sorted by probability descending then user_id. A known user has
    an event at or before as_of and no Cancellation Confirmation at or before it (a user who
    already left has nothing left to predict); with `active_days`, only those with an event in
    [as_of - active_days, as_of] (training's observation points, the scorer's daily snapshot).
    Only events at or before as_of are read.

    Raises:
        InvalidInputError: no user is known at that time.
    """
    past = events.filter(pl.col("ts") <= as_of_ms).cache()
    gone = churn_times(past).select("user_id")
    users = past.select("user_id").unique().join(gone, on="user_id", how="anti").collect().sort("user_id")
    if users.is_empty():
        msg = f"no user has an event at or before {as_of_ms} (epoch ms) without having cancelled"
        raise InvalidInputError(msg)
    features = offline.compute(past, users.with_columns(pl.lit(as_of_ms, pl.Int64).alias("as_of")))
    if active_days is not None:
        features = features.filter(pl.col("last_event_ms") >= as_of_ms - active_days * DAY_MS)
        if features.is_empty():
            msg = f"no user has an event in the {active_days} days up to {as_of_ms} (epoch ms)"
            raise InvalidInputError(msg)
    probability = model.predict(feature_matrix(features, model.features))
    return pl.DataFrame(
        {
            "user_id": features["user_id"],
            "churn_probability": probability,
            "risk_tier": model.tiers(probability).tolist(),
            "model_version": [version] * features.height,
        }
    ).sort(["churn_probability", "user_id"], descending=[True, False])


def write_scores(scores: pl.DataFrame, out: Path) -> None:
    """Writes the scores as CSV or Parquet, chosen by the suffix of `out`.

    Raises:
        InvalidInputError: the suffix is neither .csv nor .parquet.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        scores.write_csv(out)
    elif out.suffix == ".parquet":
        scores.write_parquet(out)
    else:
        msg = f"{out}: unknown output format; expected a .csv or .parquet file name"
        raise InvalidInputError(msg)
