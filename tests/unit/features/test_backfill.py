"""`churn materialize --as-of` rebuilds the scorer states from the archived log: a scorer that
then replays the topic from its start ends where one that applied every event from scratch
ends (nothing lost, nothing applied twice), wherever `as_of` falls among late events."""

from __future__ import annotations

import polars as pl
import pytest

from events.schema import Event
from features.backfill import rebuild_states
from features.online import OnlineEngine
from tests.support import START_MS, random_events, shuffle_within

LATENESS_MS = 3_600_000
PARTITIONS = 3


def _positioned(arrival: list[Event]) -> list[tuple[Event, int, int]]:
    """Returns (event, partition, offset) in arrival order, each user on one partition."""
    offsets = [0] * PARTITIONS
    out = []
    for event in arrival:
        partition = int(event.user_id[1:]) % PARTITIONS
        out.append((event, partition, offsets[partition]))
        offsets[partition] += 1
    return out


def _log(messages: list[tuple[Event, int, int]]) -> pl.LazyFrame:
    """Returns the archived log of the messages, in the columns `rebuild_states` reads."""
    return pl.DataFrame(
        [
            {
                "user_id": e.user_id, "ts": e.ts, "session_id": e.session_id, "item_in_session": e.item_in_session,
                "page": e.page, "level": e.level, "registration": e.registration, "length": e.length,
                "partition": partition, "offset": offset,
            }
            for e, partition, offset in messages
        ],
        schema_overrides={"registration": pl.Float64, "length": pl.Float64},
    ).lazy()  # fmt: skip


def _values(engine: OnlineEngine, user: str) -> dict[str, float]:
    """Returns the user's row values, NaN as None (NaN never equals itself)."""
    return {k: (None if v != v else v) for k, v in engine.row(user).values.items()}  # type: ignore[misc]


def _replayed_after_materialize(messages: list[tuple[Event, int, int]], as_of_ms: int) -> OnlineEngine:
    engine, _ = rebuild_states(_log(messages), as_of_ms, LATENESS_MS)
    for event, partition, offset in messages:  # the scorer reads each partition from its start
        engine.apply(event, partition, offset)
    return engine


def _applied_once(messages: list[tuple[Event, int, int]]) -> OnlineEngine:
    engine = OnlineEngine(lateness_ms=LATENESS_MS)
    for event, partition, offset in messages:
        engine.apply(event, partition, offset)
    return engine


def test_a_late_event_behind_the_cut_is_applied_by_the_replay_not_taken_for_a_duplicate() -> None:
    """Offsets 10, 11, 12 with event times S, S+10 min, S+5 min; as-of S+6:40 falls between the
    last two: cut by event time, offset 12 was applied and 11 became a 'duplicate' on replay."""
    times = [0, 600_000, 300_000]
    messages = [
        (Event(ts=START_MS + t, user_id="u0", session_id=1, item_in_session=i, page="NextSong",
               auth="Logged In", level="free", length=100.0), 0, 10 + i)
        for i, t in enumerate(times)
    ]  # fmt: skip
    replayed = _replayed_after_materialize(messages, START_MS + 400_000)
    assert _values(replayed, "u0") == _values(_applied_once(messages), "u0")
    assert _values(replayed, "u0")["songs_1h"] == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_materialize_at_any_instant_then_a_replay_ends_where_an_uninterrupted_scorer_ends(seed: int) -> None:
    events = random_events(seed, users=24, days=4, per_user=80)
    messages = _positioned(shuffle_within(events, LATENESS_MS, seed))
    expected = _applied_once(messages)
    times = sorted(e.ts for e in events)
    for as_of_ms in (times[len(times) // 4], times[len(times) // 2], times[-10]):
        replayed = _replayed_after_materialize(messages, as_of_ms)
        assert set(replayed.states) == set(expected.states)
        for user in expected.states:
            assert _values(replayed, user) == _values(expected, user), (as_of_ms, user)
            assert replayed.states[user].offsets == expected.states[user].offsets, (as_of_ms, user)
