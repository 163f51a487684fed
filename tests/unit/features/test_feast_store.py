"""The pure helpers of the Feast store: coalescing, event time, the push DataFrame (no services)."""

from __future__ import annotations

from datetime import UTC, datetime

from features.feast_store import event_time, latest_per_user, rows_to_frame
from features.spec import INT_FEATURES, LAST_EVENT_MS, STORED_FEATURES
from features.store import FeatureRow


def _row(user_id: str, last_event_ms: int, fill: float = 1.0) -> FeatureRow:
    return FeatureRow(user_id, last_event_ms, dict.fromkeys(STORED_FEATURES, fill))


def test_latest_per_user_keeps_the_newest_row_and_the_later_one_on_a_tie() -> None:
    rows = [_row("a", 200, 1), _row("b", 100, 1), _row("a", 100, 2), _row("b", 100, 3)]
    kept = {row.user_id: row for row in latest_per_user(rows)}
    assert kept["a"].values[STORED_FEATURES[0]] == 1  # 200 beats the later 100
    assert kept["b"].values[STORED_FEATURES[0]] == 3  # same time: the later row wins
    assert len(latest_per_user(rows)) == 2


def test_event_time_is_exact_utc_milliseconds() -> None:
    assert event_time(1_767_225_600_123) == datetime(2026, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)


def test_push_frame_has_the_view_columns_typed() -> None:
    frame = rows_to_frame([_row("a", 1_767_225_600_123, 2.0)])
    assert list(frame.columns) == ["user_id", "event_timestamp", LAST_EVENT_MS, *STORED_FEATURES]
    assert str(frame["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    assert frame["event_timestamp"][0] == event_time(1_767_225_600_123)
    for name in STORED_FEATURES:
        assert str(frame[name].dtype) == ("int64" if name in INT_FEATURES else "float64"), name
