"""A tiny random event generator for engine tests (not the simulator: no behaviour model)."""

from __future__ import annotations

import random
from typing import Literal

from events.schema import Event

PAGES = [
    "NextSong", "NextSong", "NextSong", "NextSong", "NextSong", "Home", "Thumbs Up", "Thumbs Down",
    "Add to Playlist", "Add Friend", "Roll Advert", "Error", "Help", "Settings", "Save Settings",
    "Downgrade", "Submit Downgrade", "Upgrade", "Submit Upgrade", "Logout", "About", "Some New Page",
]  # fmt: skip
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def random_events(seed: int, users: int, days: int, per_user: int = 200) -> list[Event]:
    """Returns events sorted by ts: bursts (sessions) of events at random times, ties included."""
    rng = random.Random(seed)
    events: list[Event] = []
    for u in range(users):
        user_id = f"u{u}"
        registration = float(START_MS - rng.randint(0, 90) * 86_400_000 + rng.randint(0, 10**6)) if u % 5 else None
        level: Literal["free", "paid"] = "free"
        session_id = u * 10_000
        count = 0
        while count < per_user:
            session_id += 1
            t = START_MS + rng.randint(0, days * 86_400_000)
            for item in range(rng.randint(1, 30)):
                if rng.random() < 0.02:
                    level = "paid" if level == "free" else "free"
                page = rng.choice(PAGES)
                length = round(rng.uniform(30, 600), 5) if page == "NextSong" else None
                events.append(
                    Event(
                        ts=t, user_id=user_id, session_id=session_id, item_in_session=item, page=page,
                        auth="Logged In", level=level, registration=registration, length=length,
                    )
                )  # fmt: skip
                count += 1
                t += rng.choice([0, 1000, 30_000, 200_000, 250_000])
    events.sort(key=lambda e: e.ts)
    return events


def shuffle_within(events: list[Event], lateness_ms: int, seed: int) -> list[Event]:
    """Returns the events in an arrival order where no event is later than `lateness_ms`
    behind the newest event of its user seen before it."""
    rng = random.Random(seed)
    keyed = sorted(events, key=lambda e: e.ts + rng.uniform(0, lateness_ms))
    newest: dict[str, int] = {}
    out = []
    for event in keyed:
        assert event.ts >= newest.get(event.user_id, 0) - lateness_ms
        newest[event.user_id] = max(newest.get(event.user_id, 0), event.ts)
        out.append(event)
    return out
