"""Producer benchmark: events per second published to the configured broker from one process."""

from __future__ import annotations

import platform
import time
import uuid
from typing import Final

import orjson

from core.settings import Settings
from stream.producer import PRODUCER_TUNING, publish_lines
from stream.topics import delete_topics

GOAL_EVENTS_PER_SECOND: Final = 200_000

# Shapes of real Sparkify rows (see ../shared/fixtures): songs dominate, a few page visits,
# and logged-out guests with an empty userId and null user fields.
_SONGS: Final = (
    ("Martha Tilston", "Rockpools", 277.89016),
    ("Five Iron Frenzy", "Canada", 236.09424),
    ("Adam Lambert", "Time For Miracles", 282.8273),
    ("Enigma", "Knocking On Forbidden Doors", 262.71302),
    ("Daft Punk", "Harder Better Faster Stronger", 223.60771),
    ("The All-American Rejects", "Don't Leave Me", 208.29995),
)
_PAGES: Final = ("Thumbs Up", "Home", "Add to Playlist", "Roll Advert", "Thumbs Down", "Settings", "Help")
_AGENTS: Final = (
    "Mozilla/5.0 (Windows NT 6.1; WOW64; rv:31.0) Gecko/20100101 Firefox/31.0",
    '"Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/37.0.2062.103 Safari/537.36"',
)
_FIRST_TS_MS: Final = 1_538_352_117_000


def _templates() -> tuple[list[bytes], list[bytes]]:
    """Returns (logged-in, guest) row templates as JSON bytes with %-placeholders for the
    per-event fields, so generation is one bytes formatting per event, not a dict + encode.
    """
    logged_in, guests = [], []
    for variant in range(len(_SONGS) + len(_PAGES)):
        for half in (0, 1):
            row: dict[str, object] = {
                "ts": -1, "userId": "@U@", "sessionId": -2, "page": "NextSong", "auth": "Logged In",
                "method": "PUT", "status": 200, "level": "@L@", "itemInSession": -3,
                "location": ("Boston-Cambridge-Newton, MA-NH", "Bakersfield, CA")[half],
                "userAgent": _AGENTS[half], "lastName": "Freeman", "firstName": "Colin",
                "registration": -4, "gender": "MF"[half], "artist": None, "song": None, "length": None,
            }  # fmt: skip
            if variant < len(_SONGS):
                row["artist"], row["song"], row["length"] = _SONGS[variant]
            else:
                row["page"], row["method"] = _PAGES[variant - len(_SONGS)], "GET"
            logged_in.append(_placeholders(orjson.dumps(row)))
    guest: dict[str, object] = {
        "ts": -1, "userId": "", "sessionId": -2, "page": "Home", "auth": "Logged Out", "method": "GET",
        "status": 200, "level": "@L@", "itemInSession": -3, "location": None, "userAgent": None,
        "lastName": None, "firstName": None, "registration": None, "gender": None,
        "artist": None, "song": None, "length": None,
    }  # fmt: skip
    guests.append(_placeholders(orjson.dumps(guest)))
    return logged_in, guests


def _placeholders(encoded: bytes) -> bytes:
    for sentinel, placeholder in (
        (b":-1,", b":%d,"), (b'"@U@"', b'"%d"'), (b":-2,", b":%d,"), (b'"@L@"', b'"%s"'),
        (b":-3,", b":%d,"), (b":-4,", b":%d,"),
    ):  # fmt: skip
        encoded = encoded.replace(sentinel, placeholder)
    return encoded


def make_events(count: int, *, users: int = 5_000, seed: int = 7) -> list[bytes]:
    """Returns `count` distinct realistic events (JSON bytes, ~430 bytes each) in event-time
    order: ~80% songs, ~15% other pages, ~5% guests (empty userId), over `users` users.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    logged_in, (guest,) = _templates()
    n_songs = len(_SONGS) * 2
    user_ids = rng.integers(1, users + 1, count).tolist()
    times = (_FIRST_TS_MS + rng.integers(0, 81, count).cumsum()).tolist()
    rolls = rng.random(count).tolist()
    pages = rng.integers(n_songs, len(logged_in), count).tolist()
    songs = rng.integers(0, n_songs, count).tolist()
    out = []
    for i, (user, ts, roll) in enumerate(zip(user_ids, times, rolls, strict=True)):
        session, item, level = user * 7 + i // 50_000, i % 300, b"paid" if user % 3 else b"free"
        if roll < 0.95:
            template = logged_in[songs[i] if roll < 0.80 else pages[i]]
            out.append(template % (ts, user, session, level, item, 1_538_173_362_000 + user * 1000))
        else:
            out.append(guest % (ts, session, level, item))
    return out


def bench_produce(settings: Settings, *, events: int = 1_000_000) -> dict[str, object]:
    """Publishes `events` pre-generated events to a fresh topic with `settings.topic_partitions`
    partitions, through the real `publish_lines` path, then deletes the topic.

    Returns:
        JSON-ready figures: events/s, MB/s, counts, the producer tuning and the goal.

    Raises:
        ServiceUnavailableError: Kafka cannot be reached.
    """
    lines = make_events(events)
    name = f"bench-events-{uuid.uuid4().hex[:10]}"
    # A copy of the frozen settings pointing at throwaway topics; the real ones stay untouched.
    bench_settings = settings.model_copy(update={"events_topic": name, "dlq_topic": f"{name}.dlq"})
    cpu_started = time.process_time()  # all threads: Python loop plus librdkafka's
    try:
        report = publish_lines(bench_settings, lines)
        cpu_seconds = time.process_time() - cpu_started
    finally:
        delete_topics(settings, [name, f"{name}.dlq"])
    megabytes = sum(len(line) for line in lines) / 1e6
    return {
        "benchmark": "produce",
        "events": events,
        "partitions": settings.topic_partitions,
        "sent": report.sent,
        "failed": report.failed,
        "malformed": report.malformed,
        "elapsed_seconds": round(report.elapsed_seconds, 3),
        "events_per_second": round(report.events_per_second),
        "megabytes_per_second": round(megabytes / report.elapsed_seconds, 1) if report.elapsed_seconds else 0.0,
        "producer_cpu_seconds": round(cpu_seconds, 3),
        "events_per_cpu_second": round(report.sent / cpu_seconds) if cpu_seconds else 0,
        "mean_event_bytes": round(megabytes * 1e6 / max(events, 1)),
        "goal_events_per_second": GOAL_EVENTS_PER_SECOND,
        "meets_goal": report.events_per_second >= GOAL_EVENTS_PER_SECOND and report.failed == 0,
        "producer": {k: v for k, v in PRODUCER_TUNING.items() if k != "message.timeout.ms"},
        "bootstrap_servers": settings.bootstrap_servers,
        "python": platform.python_version(),
    }
