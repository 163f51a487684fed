"""Point-in-time training sets: no feature reads the future, no label reads the past, time splits keep gaps."""

from __future__ import annotations

import gzip
from pathlib import Path

import msgspec
import numpy as np
import polars as pl
import pytest

from core.errors import InvalidInputError
from events.log import events_frame, load_events
from events.schema import CHURN_PAGE, Event
from features import spec
from tests.support import START_MS, random_events
from training import dataset, split

DAY = spec.DAY_MS


def _frame(events: list[Event]) -> pl.LazyFrame:
    return events_frame(pl.DataFrame([msgspec.to_builtins(e) for e in events]))


def _cancel(user: str, ts: int) -> Event:
    return Event(
        ts=ts, user_id=user, session_id=999_999, item_in_session=0, page=CHURN_PAGE, auth="Cancelled", level="free"
    )


GRID = dataset.GridConfig(horizon_days=3, step_hours=24, lookback_days=28)


def test_features_ignore_events_after_the_observation_time() -> None:
    events = random_events(seed=3, users=12, days=20, per_user=150)
    cutoff = START_MS + 10 * DAY
    base, _ = dataset.build(_frame([*events, _cancel("u1", START_MS + 12 * DAY)]), GRID)
    later = random_events(seed=4, users=12, days=8, per_user=100)
    shifted = [msgspec.structs.replace(e, ts=e.ts + 11 * DAY) for e in later]  # all strictly after cutoff
    assert min(e.ts for e in shifted) > cutoff
    extended, _ = dataset.build(_frame([*events, _cancel("u1", START_MS + 12 * DAY), *shifted]), GRID)
    columns = ["user_id", "as_of", "last_event_ms", *spec.MODEL_FEATURES]
    before = base.filter(pl.col("as_of") <= cutoff).select(columns)
    after = extended.filter(pl.col("as_of") <= cutoff).select(columns)
    assert before.height > 50
    assert before.equals(after)


def test_labels_use_only_events_after_the_observation_time() -> None:
    events = random_events(seed=5, users=6, days=20, per_user=150)
    t = START_MS + 10 * DAY
    churners = [
        _cancel("u1", t),  # at t: already gone at t, positive at t - 1 day
        _cancel("u2", t + 3 * DAY),  # exactly t + H: positive at t
        _cancel("u3", t + 3 * DAY + 1),  # just after the window: negative at t
    ]
    frame, _ = dataset.build(_frame([*events, *churners]), GRID)

    def label(user: str, as_of: int) -> int | None:
        rows = frame.filter((pl.col("user_id") == user) & (pl.col("as_of") == as_of))
        return None if rows.is_empty() else rows["label"][0]

    assert label("u1", t) is None
    assert label("u1", t - DAY) == 1
    assert label("u2", t) == 1
    assert label("u3", t) == 0
    assert label("u3", t + DAY) == 1
    # Label windows that run past the last event are not labelled.
    last = max(e.ts for e in [*events, *churners])
    assert (
        frame.filter(pl.col("as_of") + 3 * DAY > last)["label"].null_count()
        == frame.filter(pl.col("as_of") + 3 * DAY > last).height
    )


def test_time_split_keeps_gaps_of_the_horizon() -> None:
    times = START_MS + np.arange(60) * DAY
    for horizon in (1, 7, 14):
        parts = split.split_times(times, horizon)
        assert parts.valid[0] - parts.train[-1] >= horizon * DAY
        assert parts.test[0] - parts.valid[-1] >= horizon * DAY
        assert max(parts.train) < min(parts.valid)
        assert max(parts.valid) < min(parts.test)
    with pytest.raises(InvalidInputError, match="too short"):
        split.split_times(times[:20], 14)


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        load_events(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"no \.parquet"):
        load_events(tmp_path / "empty")
    (tmp_path / "blank.jsonl").write_text("")
    with pytest.raises(InvalidInputError, match="empty"):
        load_events(tmp_path / "blank.jsonl")
    (tmp_path / "junk.jsonl.gz").write_bytes(gzip.compress(b"not json\n"))
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_events(tmp_path / "junk.jsonl.gz")
    events = random_events(seed=1, users=5, days=30, per_user=100)
    no_churn = tmp_path / "no_churn.jsonl"
    no_churn.write_bytes(b"\n".join(e.to_json() for e in events))
    with pytest.raises(InvalidInputError, match="no user churns"):
        dataset.build(load_events(no_churn), GRID)
    short = [e for e in events if e.ts < START_MS + 2 * DAY] + [_cancel("u1", START_MS + DAY)]
    with pytest.raises(InvalidInputError, match="too short"):
        dataset.build(_frame(short), dataset.GridConfig(horizon_days=14))


def test_reads_partitioned_parquet_like_jsonl(tmp_path: Path) -> None:
    events = random_events(seed=2, users=4, days=3, per_user=50)
    lines = tmp_path / "log.jsonl"
    lines.write_bytes(b"\n".join(e.to_json() for e in events))
    raw = pl.read_ndjson(lines).with_columns(pl.from_epoch("ts", time_unit="ms").dt.date().alias("date"))
    for (day,), part in raw.partition_by("date", as_dict=True).items():
        (tmp_path / "log" / f"date={day}").mkdir(parents=True)
        part.drop("date").write_parquet(tmp_path / "log" / f"date={day}" / "part-0.parquet")
    order = ["user_id", "ts", "session_id", "item_in_session"]
    from_parquet = load_events(tmp_path / "log").collect().sort(order)
    from_lines = load_events(lines).collect().sort(order)
    assert from_parquet.equals(from_lines)


def test_a_finer_grid_weighs_each_user_day_once() -> None:
    events = _frame([*random_events(seed=5, users=10, days=20, per_user=80), _cancel("u1", START_MS + 12 * DAY)])
    daily, _ = dataset.build(events, GRID)
    fine, _ = dataset.build(events, dataset.GridConfig(horizon_days=3, step_hours=6, lookback_days=28))
    assert fine.height > 3 * daily.height  # four points a day where the daily grid has one
    weighted = dataset.with_weights(fine).with_columns((pl.col("as_of") // DAY).alias("day"))
    per_user_day = weighted.group_by("user_id", "day").agg(pl.col("weight").sum())
    assert np.allclose(per_user_day["weight"].to_numpy(), 1.0)
    # A user observed on fewer grid points of a day (joining or leaving) still weighs 1 there.
    counts = weighted.group_by("user_id", "day").len()
    per_day = counts["len"].to_numpy()
    assert per_day.min() < per_day.max()
    assert dataset.with_weights(daily)["weight"].to_list() == [1.0] * daily.height
