"""Invariant 1: one spec, two engines, no skew."""

from __future__ import annotations

import math
import random

import polars as pl
import pytest

from events.log import events_frame
from events.schema import Event
from features import offline, spec
from features.online import LATE, OnlineEngine
from tests.support import random_events, shuffle_within, wire_frame

LATENESS_MS = 3_600_000


def assert_rows_equal(online: dict[str, float], offline_row: dict[str, object], context: str) -> None:
    for name in spec.STORED_FEATURES:
        a, b = online[name], offline_row[name]
        if name in spec.INT_FEATURES:
            assert a == b, f"{context}: {name} online={a} offline={b}"
        elif isinstance(a, float) and math.isnan(a):
            assert b is None or math.isnan(b), f"{context}: {name} online=nan offline={b}"  # type: ignore[arg-type]
        else:
            assert b is not None, f"{context}: {name} online={a} offline=None"
            assert math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0), f"{context}: {name} online={a} offline={b}"  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [1, 2])
def test_online_equals_offline_at_checkpoints_with_late_events(seed: int) -> None:
    events = random_events(seed, users=40, days=45, per_user=300)
    arrival = shuffle_within(events, LATENESS_MS, seed)
    engine = OnlineEngine(lateness_ms=LATENESS_MS)
    checkpoints = sorted({len(arrival) // 4, len(arrival) // 2, 3 * len(arrival) // 4, len(arrival)})
    done = 0
    for checkpoint in checkpoints:
        for event in arrival[done:checkpoint]:
            assert engine.apply(event) != LATE
        done = checkpoint
        prefix = arrival[:checkpoint]
        watermark = max(e.ts for e in prefix)
        users = sorted(engine.states)
        points = pl.DataFrame({"user_id": users, "as_of": [watermark] * len(users)})
        table = offline.compute(wire_frame(prefix), points)
        for user, offline_row in zip(users, table.iter_rows(named=True), strict=True):
            online_row = engine.row(user)
            assert offline_row["last_event_ms"] == online_row.last_event_ms
            assert math.isclose(offline_row["seconds_since_last_event"], (watermark - online_row.last_event_ms) / 1000)
            assert_rows_equal(online_row.values, offline_row, f"user {user} at {checkpoint}")


@pytest.mark.parametrize("seed", [1, 2])
def test_training_leaves_out_the_late_events_the_stream_ignores(seed: int) -> None:
    """Events up to three times the allowed lateness late: the online engine ignores some
    (LATE). The log training reads, passed through `offline.as_streamed`, gives the rows the
    online engine holds, user by user."""
    events = random_events(seed, users=30, days=10, per_user=150)
    arrival = _late_arrival(events, seed)
    engine = OnlineEngine(lateness_ms=LATENESS_MS)
    partition_of = {u: int(u[1:]) % 3 for u in {e.user_id for e in events}}
    offsets: dict[int, int] = {}
    positions = []
    late = 0
    for event in arrival:
        partition = partition_of[event.user_id]
        offset = offsets[partition] = offsets.get(partition, -1) + 1
        positions.append((partition, offset))
        late += engine.apply(event, partition, offset) == LATE
    assert late > 0  # the case this test is about
    log = events_frame(
        wire_frame(arrival).with_columns(
            pl.Series("partition", [p for p, _ in positions]), pl.Series("offset", [o for _, o in positions])
        ),
        keep=("partition", "offset"),
    )
    applied = offline.as_streamed(log, LATENESS_MS)
    assert applied.select(pl.len()).collect().item() == len(events) - late
    watermark = max(e.ts for e in events)
    users = sorted(engine.states)
    points = pl.DataFrame({"user_id": users, "as_of": [watermark] * len(users)})
    table = offline.compute(applied, points)
    for user, offline_row in zip(users, table.iter_rows(named=True), strict=True):
        assert_rows_equal(engine.row(user).values, offline_row, f"user {user}")


def _late_arrival(events: list[Event], seed: int) -> list[Event]:
    """Returns the events in an arrival order where a tenth arrive 0-3x the allowed lateness
    after their time (the rest in time order)."""
    rng = random.Random(seed)
    delayed = [e.ts + (rng.uniform(0, 3 * LATENESS_MS) if rng.random() < 0.1 else 0) for e in events]
    return [e for _, _, e in sorted(zip(delayed, range(len(events)), events, strict=True))]
