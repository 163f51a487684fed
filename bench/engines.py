"""Benchmarks of the two feature engines (no I/O): online events/s and offline seconds."""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np
import polars as pl

from core.gc_policy import freeze_survivors
from events.schema import Event
from features import offline
from features.online import STATE_ENCODER, OnlineEngine

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PAGES = np.array(
    ["NextSong"] * 14 + ["Home", "Thumbs Up", "Thumbs Down", "Add to Playlist", "Roll Advert", "Error", "Settings"]
)


def synthetic_log(events: int, users: int, days: int, seed: int = 0) -> pl.DataFrame:
    """Returns a random event log (engine columns) of sessions: bursts of events 3-4 min apart."""
    rng = np.random.default_rng(seed)
    per_session = 20
    sessions = events // per_session
    user = rng.integers(0, users, sessions)
    start = START_MS + rng.integers(0, days * 86_400_000, sessions)
    step = np.tile(np.arange(per_session) * 210_000, sessions)
    ts = np.repeat(start, per_session) + step
    page = PAGES[rng.integers(0, len(PAGES), sessions * per_session)]
    return pl.DataFrame(
        {
            "user_id": np.char.add("u", np.repeat(user, per_session).astype(str)),
            "ts": ts,
            "session_id": np.repeat(np.arange(sessions), per_session),
            "item_in_session": np.tile(np.arange(per_session), sessions),
            "page": page,
            "level": np.where(np.repeat(user, per_session) % 3 == 0, "paid", "free"),
            "registration": np.repeat((START_MS - user * 3_600_000).astype(np.float64), per_session),
            "length": np.where(page == "NextSong", 200.0 + (ts % 100_000) / 1000, np.nan),
        }
    ).with_columns(pl.col("length").fill_nan(None))


def bench_online(
    events: int = 1_000_000, users: int = 10_000, batches: tuple[int, ...] = (50_000, 20_000, 1_000)
) -> dict[str, Any]:
    """Returns online-engine figures: events/s for state updates plus one row per touched user per
    micro-batch, for each micro-batch size in `batches` (the first is the headline: the scorer's
    default `max_batch_events`, what it takes per poll when catching up; 1,000 is live-sized:
    a 10k/s stream arrives in batches of about that or less, nearly one user per event), and
    serialised state bytes per active user. The loop runs under the scorer's collector policy
    (`freeze_survivors` after each batch, its time counted): without it, CPython's full
    collections walk every state of the run again and again, which the scorer never does."""
    log = synthetic_log(events, users, days=30).sort("ts")
    stream = [
        Event(
            ts=r[1], user_id=r[0], session_id=r[2], item_in_session=r[3], page=r[4], auth="Logged In",
            level=r[5], registration=r[6], length=r[7],
        )
        for r in log.iter_rows()
    ]  # fmt: skip
    figures: dict[str, Any] = {"online_events": len(stream)}
    for run, batch in enumerate(batches):
        engine = OnlineEngine()
        rows = 0
        freeze_survivors()  # the event list and the rest of start-up, as the scorer does once
        started = time.perf_counter()
        for first in range(0, len(stream), batch):
            touched = set()
            for offset, event in enumerate(stream[first : first + batch], start=first):
                engine.apply(event, 0, offset)
                touched.add(event.user_id)
            for user in touched:
                engine.row(user)
            rows += len(touched)
            freeze_survivors()
        elapsed = time.perf_counter() - started
        gc.unfreeze()
        suffix = "" if run == 0 else f"_batch_{batch}"
        figures[f"online_events_per_s{suffix}"] = round(len(stream) / elapsed)
        figures[f"online_rows_built{suffix}"] = rows
        figures[f"online_batch_events{suffix}"] = batch
    sizes = [len(STATE_ENCODER.encode(s)) for s in engine.states.values()]
    figures["online_state_bytes_per_user"] = round(float(np.mean(sizes)))
    return figures


def bench_offline(points: int = 1_000_000, events: int = 10_000_000, users: int = 10_000) -> dict[str, Any]:
    """Returns seconds for the offline engine to build `points` point-in-time rows over `events`."""
    log = synthetic_log(events, users, days=60)
    rng = np.random.default_rng(1)
    grid = pl.DataFrame(
        {
            "user_id": np.char.add("u", rng.integers(0, users, points).astype(str)),
            "as_of": START_MS + rng.integers(0, 60 * 86_400_000, points),
        }
    )
    started = time.perf_counter()
    table = offline.compute(log, grid)
    elapsed = time.perf_counter() - started
    return {
        "offline_events": log.height,
        "offline_points": table.height,
        "offline_seconds": round(elapsed, 2),
    }
