"""Invariant 1: one spec, two engines, no skew."""

from __future__ import annotations

import math

import polars as pl
import pytest

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
