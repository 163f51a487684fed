"""Bounded state: the session cap of the online engine, and the applied-offsets check of the
state store (a store gone back in time refuses the save)."""

from __future__ import annotations

import polars as pl
import pytest

from events.schema import Event
from features import offline
from features.online import MAX_SESSIONS, OnlineEngine
from features.state_store import NOTHING_APPLIED, InMemoryStateStore, StateRolledBackError
from tests.support import START_MS, wire_frame
from tests.unit.features.test_parity import assert_rows_equal


def test_sessions_are_capped_and_rows_still_equal_the_offline_engine() -> None:
    # One client opening a new session every 10 s for a day: 8,640 sessions inside every window.
    events = [
        Event(ts=START_MS + i * 10_000, user_id="bot", session_id=i, item_in_session=0, page="Home",
              auth="Logged In", level="free", registration=None, length=None)
        for i in range(8_640)
    ]  # fmt: skip
    engine = OnlineEngine()
    longest = 0
    for event in events:
        engine.apply(event)
        longest = max(longest, len(engine.states["bot"].sessions))
    assert longest <= MAX_SESSIONS
    assert longest == MAX_SESSIONS  # the cap is reached, not some smaller bound
    # Forgotten sessions keep their counted start: every window still agrees with the offline engine.
    last = events[-1].ts
    table = offline.compute(wire_frame(events), pl.DataFrame({"user_id": ["bot"], "as_of": [last]}))
    assert_rows_equal(engine.row("bot").values, table.row(0, named=True), "bot")


def test_a_store_gone_back_in_time_refuses_the_save() -> None:
    store = InMemoryStateStore()
    store.save({"u": b"1"}, {"events:0": 10, "events:1": 4}, {})
    assert store.applied(["events:0", "events:1", "events:2"]) == {"events:0": 10, "events:1": 4, "events:2": -1}
    store.offsets["events:0"] = 6  # as if Redis restarted from older files
    with pytest.raises(StateRolledBackError) as raised:
        store.save({"u": b"2"}, {"events:0": 12}, {"events:0": 10, "events:1": 4})
    assert raised.value.behind == {"events:0": 6}
    assert store.blobs == {"u": b"1"}  # nothing of the refused save was written
    store.save({"u": b"2"}, {"events:0": 12}, {"events:0": 6})
    assert store.applied(["events:0"]) == {"events:0": 12}
    assert NOTHING_APPLIED == -1
