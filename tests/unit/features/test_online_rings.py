"""The online engine's tile rings: a reused record never leaks an expired tile into a window,
a state never grows, and saved states are keyed by their layout."""

from __future__ import annotations

import dataclasses

import pytest

from events.schema import Event
from features import spec
from features.online import STATE_ENCODER, OnlineEngine, state_layout
from tests.support import START_MS

FIVE_MIN = 5 * spec.MINUTE_MS


def event(ts: int, session: int, page: str = "NextSong") -> Event:
    return Event(
        ts=ts, user_id="u", session_id=session, item_in_session=0, page=page, auth="Logged In",
        level="free", registration=float(START_MS), length=100.0 if page == "NextSong" else None,
    )  # fmt: skip


def test_a_tile_overwrites_the_expired_one_in_its_record() -> None:
    engine = OnlineEngine()
    keep = next(g.keep_tiles for g in engine.plan.granularities if g.ms == FIVE_MIN)
    engine.apply(event(START_MS, session=1))
    # Exactly one ring length later: the same 5-minute record, another tile.
    engine.apply(event(START_MS + keep * FIVE_MIN, session=2, page="Home"))
    values = engine.row("u").values
    assert values["events_1h"] == 1
    assert values["songs_1h"] == 0
    assert values["events_24h"] == 2
    assert values["songs_24h"] == 1


def test_a_late_session_start_is_moved_within_the_ring_only() -> None:
    engine = OnlineEngine(lateness_ms=spec.HOUR_MS)
    engine.apply(event(START_MS + 30 * spec.MINUTE_MS, session=1))
    engine.apply(event(START_MS + 10 * spec.MINUTE_MS, session=1))  # late: the session started earlier
    values = engine.row("u").values
    assert values["sessions_24h"] == 1
    assert values["events_1h"] == 2


def test_state_size_does_not_grow_with_history() -> None:
    engine = OnlineEngine()
    sizes = []
    for day in range(60):
        for i in range(30):
            engine.apply(event(START_MS + day * spec.DAY_MS + i * 4 * spec.MINUTE_MS, session=day))
        sizes.append([len(ring) for ring in engine.states["u"].tiles])
    assert all(s == sizes[0] for s in sizes)
    assert len(STATE_ENCODER.encode(engine.states["u"])) < 2_000


def test_layout_tag_follows_the_lateness() -> None:
    assert OnlineEngine().state_layout == state_layout(3_600_000)
    assert state_layout(3_600_000) != state_layout(7_200_000)


def test_layout_tag_follows_what_a_slot_sums_not_only_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """An aggregate redefined under the same name (other pages) must not read the saved sums."""
    before = state_layout(3_600_000)
    edited = tuple(
        dataclasses.replace(a, pages=frozenset({"Settings"})) if a.name == "settings_visits" else a
        for a in spec.AGGREGATES
    )
    assert edited != spec.AGGREGATES
    monkeypatch.setattr(spec, "AGGREGATES", edited)
    assert state_layout(3_600_000) != before
