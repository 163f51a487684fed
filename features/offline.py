"""Offline (batch, point-in-time) feature engine on polars, generated from `features.spec`.

For each (user_id, as_of) point it finds the user's latest event L at or before `as_of` and
builds the row as of L, exactly like the online engine: per-user cumulative sums of every
aggregate over event time, read at L and just below each window's lower tile edge (as-of
joins), differences give the window sums. Nothing after `as_of` is ever read.
"""

from __future__ import annotations

import polars as pl

from events.log import EVENT_COLUMNS, events_frame
from features import spec


def _aggregate_exprs() -> list[pl.Expr]:
    exprs = []
    for agg in spec.AGGREGATES:
        if agg.measure == "events":
            hit = pl.lit(True) if agg.pages is None else pl.col("page").is_in(sorted(agg.pages))
            exprs.append(hit.cast(pl.Int64).alias(agg.name))
        elif agg.measure == "listen_ms":
            song = pl.col("page").is_in(sorted(agg.pages or ())) & pl.col("length").is_not_null()
            exprs.append(
                pl.when(song).then((pl.col("length") * 1000).round(0)).otherwise(0).cast(pl.Int64).alias(agg.name)
            )
    return exprs


def _history(events: pl.LazyFrame) -> pl.LazyFrame:
    """Returns one row per (user_id, ts): cumulative sums of every aggregate up to ts, and the
    latest event's state at ts (session, level, registration, events in its session)."""
    session_aggs = [a.name for a in spec.AGGREGATES if a.measure == "session_starts"]
    ordered = events.sort("user_id", "ts", "session_id", "item_in_session")
    per_event = ordered.with_columns(
        *_aggregate_exprs(),
        pl.int_range(1, pl.len() + 1).over("user_id", "session_id").alias("session_events"),
    )
    # A session counts at its first event: one start row per (user, session) at its min ts.
    starts = (
        events.group_by("user_id", "session_id")
        .agg(pl.col("ts").min())
        .select("user_id", "ts", *[pl.lit(1, pl.Int64).alias(name) for name in session_aggs])
    )
    sums = [a.name for a in spec.AGGREGATES if a.measure != "session_starts"]
    counted = pl.concat([per_event.select("user_id", "ts", *sums), starts], how="diagonal").fill_null(0)
    all_aggs = [a.name for a in spec.AGGREGATES]
    cumulative = (
        counted.group_by("user_id", "ts")
        .agg(pl.col(all_aggs).sum())
        .sort("user_id", "ts")
        .with_columns(pl.col(all_aggs).cum_sum().over("user_id"))
    )
    latest = per_event.group_by("user_id", "ts").agg(
        pl.col("session_id").last().alias("last_session"),
        (pl.col("level").last() == "paid").cast(pl.Int64).alias("level_paid"),
        pl.col("registration").last(),
        pl.col("session_events").last().alias("events_in_current_session"),
    )
    return cumulative.join(latest, on=["user_id", "ts"], how="left").sort("ts")


def compute(events: pl.DataFrame | pl.LazyFrame, points: pl.DataFrame) -> pl.DataFrame:
    """Returns the feature rows for (user_id, as_of) points (as_of in epoch ms).

    Output: the points' columns (in the points' order), `last_event_ms` (null if the user
    had no event at or before as_of; then every feature is null too), every
    `spec.STORED_FEATURES` column and the request-time `seconds_since_last_event` with now = as_of.
    """
    history = _history(events_frame(events))
    left = points.lazy().with_row_index("_row").with_columns(pl.col("as_of").cast(pl.Int64)).sort("as_of")
    base = left.join_asof(
        history, left_on="as_of", right_on="ts", by="user_id", strategy="backward", check_sortedness=False
    ).rename({"ts": "last_event_ms"})
    windows = sorted({(f.window.granularity_ms, f.window.tiles) for f in spec.WINDOW_FEATURES})
    for g, n in windows:
        aggs = sorted(
            {f.aggregate for f in spec.WINDOW_FEATURES if f.window.granularity_ms == g and f.window.tiles == n}
        )
        edge = f"_edge_{g}_{n}"
        lower = history.select("user_id", "ts", *[pl.col(a).alias(f"_lo_{g}_{n}_{a}") for a in aggs])
        base = (
            base.with_columns(((pl.col("last_event_ms") // g - n + 1) * g - 1).alias(edge))
            .sort(edge)
            .join_asof(lower, left_on=edge, right_on="ts", by="user_id", strategy="backward", check_sortedness=False)
            .drop("ts", edge)
        )
    out = []
    for f in spec.WINDOW_FEATURES:
        g, n = f.window.granularity_ms, f.window.tiles
        value = pl.col(f.aggregate) - pl.col(f"_lo_{g}_{n}_{f.aggregate}").fill_null(0)
        out.append(value.alias(f.name) if f.dtype == "int" else (value * f.scale).alias(f.name))
    base = base.with_columns(out)
    derived = [(pl.col(r.numerator) / pl.max_horizontal(pl.col(r.denominator), 1)).alias(r.name) for r in spec.RATIOS]
    for trend in spec.TRENDS:
        recent_tiles, earlier_tiles = trend.tiles()
        earlier = pl.col(trend.long) - pl.col(trend.recent)
        # Integer arithmetic up to one division, as in the online engine: identical rounding.
        trend_value = (pl.col(trend.recent) + 1) * earlier_tiles / (earlier * recent_tiles + earlier_tiles)
        derived.append(trend_value.alias(trend.name))
    derived.append(
        pl.when(pl.col("last_event_ms").is_not_null())
        .then(((pl.col("last_event_ms") - pl.col("registration")) * spec.DAYS_PER_MS).fill_null(float("nan")))
        .alias("days_since_registration")
    )
    derived.append(
        ((pl.col("as_of") - pl.col("last_event_ms")) * spec.SECONDS_PER_MS).alias("seconds_since_last_event")
    )
    point_columns = list(points.columns)
    return (
        base.with_columns(derived)
        .sort("_row")
        .select(*point_columns, "last_event_ms", *spec.STORED_FEATURES, "seconds_since_last_event")
        .collect()
    )


def as_streamed(log: pl.LazyFrame, lateness_ms: int) -> pl.LazyFrame:
    """Returns the events of `log` (engine columns plus `partition`/`offset`, see
    `events.log.load_events_with_positions`) that the stream applies, in the engine columns:
    an event older than its user's newest earlier event by more than `lateness_ms` is left
    out, as `features.online.OnlineEngine.apply` ignores it (LATE). "Earlier" is Kafka's order,
    offsets within a partition (a user's events share one partition); events without offsets
    (-1) come in event-time order, where none is late.

    Why: the stream ignores such an event for good, so a model trained on rows that count it
    sees features the scorer never computes (one Thumbs Down two hours late moved
    `thumbs_down_7d` from 0 to 1 offline)."""
    newest_before = pl.col("ts").cum_max().shift(1).over("user_id")
    return (
        log.sort("partition", "offset", "ts", maintain_order=True)
        .filter(newest_before.is_null() | (pl.col("ts") >= newest_before - lateness_ms))
        .select(EVENT_COLUMNS)
    )
