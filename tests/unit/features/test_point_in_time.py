"""Invariant 2 for features: nothing after as_of is used; window edges are where the spec says."""

from __future__ import annotations

import polars as pl

from events.schema import Event
from features import offline, spec
from features.online import OnlineEngine
from tests.support import START_MS, wire_frame

AS_OF = START_MS + 10 * spec.DAY_MS + 5 * spec.HOUR_MS + 17 * spec.MINUTE_MS + 123


def song(ts: int, session: int = 1, item: int = 0) -> Event:
    return Event(
        ts=ts, user_id="u", session_id=session, item_in_session=item, page="NextSong", auth="Logged In",
        level="paid", registration=float(START_MS - spec.DAY_MS), length=200.5,
    )  # fmt: skip


def features_at(events: list[Event], as_of: int) -> dict[str, object]:
    table = offline.compute(wire_frame(events), pl.DataFrame({"user_id": ["u"], "as_of": [as_of]}))
    return table.row(0, named=True)


def test_an_event_one_ms_after_as_of_changes_nothing() -> None:
    history = [song(AS_OF - i * 3_600_000, session=i // 3, item=i % 3) for i in range(40)]
    before = features_at(history, AS_OF)
    after = features_at([*history, song(AS_OF + 1, session=99)], AS_OF)
    assert before == after


def test_window_edges_snap_to_tiles() -> None:
    day_start = AS_OF // spec.DAY_MS * spec.DAY_MS
    hour_start = AS_OF // spec.HOUR_MS * spec.HOUR_MS
    five_min_start = AS_OF // (5 * spec.MINUTE_MS) * (5 * spec.MINUTE_MS)
    cases = {
        # 7d = today so far + the 6 days before: the first ms of day -6 is in, the last ms of day -7 out.
        day_start - 6 * spec.DAY_MS: ("songs_7d", 1),
        day_start - 6 * spec.DAY_MS - 1: ("songs_7d", 0),
        day_start - 27 * spec.DAY_MS: ("songs_28d", 1),
        day_start - 27 * spec.DAY_MS - 1: ("songs_28d", 0),
        hour_start - 23 * spec.HOUR_MS: ("songs_24h", 1),
        hour_start - 23 * spec.HOUR_MS - 1: ("songs_24h", 0),
        five_min_start - 11 * 5 * spec.MINUTE_MS: ("songs_1h", 1),
        five_min_start - 11 * 5 * spec.MINUTE_MS - 1: ("songs_1h", 0),
    }
    for ts, (name, expected) in cases.items():
        events = [song(ts, session=1), song(AS_OF, session=2)]
        offline_row = features_at(events, AS_OF)
        engine = OnlineEngine()
        engine.apply_all(events)
        online_row = engine.row("u").values
        assert offline_row[name] == online_row[name] == expected + 1, (name, ts)


def test_row_is_as_of_the_latest_event_and_recency_uses_the_clock() -> None:
    events = [song(AS_OF - 5000)]
    row = features_at(events, AS_OF)
    assert row["last_event_ms"] == AS_OF - 5000
    assert row["seconds_since_last_event"] == 5.0
    assert row["listening_seconds_24h"] == 200.5
    assert features_at(events, AS_OF - 5001)["last_event_ms"] is None
