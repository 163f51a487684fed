"""The one declarative feature spec. Both engines and the Feast feature view are generated from it.

Semantics (documented once, implemented by `features.online` and `features.offline`):

* A feature row describes a user **as of their latest event** L (the largest (ts, sessionId,
  itemInSession) seen). This is exactly what the online store holds between events, so the
  training set uses the same definition: for an observation time t, the row is built as of
  the user's last event at or before t, and the request-time feature
  `seconds_since_last_event = now - L` carries the elapsed time. No skew by construction.
* Windows run on event time over fixed tiles of `granularity`: a window of `size` at L holds
  the events with `floor(ts / g) > floor(L / g) - size / g` and `ts <= L`. So "7d" is the
  current UTC day so far plus the 6 days before it; "1h" is the current 5-minute tile plus the
  11 before it. Upper edges are exact, lower edges snap to tile boundaries; this is what lets
  the online engine expire old events without keeping them.
* Listening time is summed in whole milliseconds (`round(length * 1000)`), so sums are exact
  integers in both engines.
* A session counts in a window if its first event (smallest ts) falls in the window.
* Ratios are `numerator / max(denominator, 1)`; the trend is smoothed (see `Trend`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, Literal

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 86_400_000
# Unit conversions multiply by these constants in every engine: polars may turn a division
# by a constant into a multiplication by its reciprocal, so dividing could differ by an ulp.
DAYS_PER_MS: Final = 1 / DAY_MS
SECONDS_PER_MS: Final = 0.001


@dataclass(frozen=True)
class Window:
    """A window on event time, evaluated over tiles of `granularity_ms`."""

    name: str
    size_ms: int
    granularity_ms: int

    @property
    def tiles(self) -> int:
        """Returns how many tiles the window spans (including the current, partial one)."""
        return self.size_ms // self.granularity_ms


W1H: Final = Window("1h", HOUR_MS, 5 * MINUTE_MS)
W24H: Final = Window("24h", DAY_MS, HOUR_MS)
W7D: Final = Window("7d", 7 * DAY_MS, DAY_MS)
W28D: Final = Window("28d", 28 * DAY_MS, DAY_MS)
WINDOWS: Final = (W1H, W24H, W7D, W28D)

# What an aggregate counts: every event, the events of some pages, or session starts.
Measure = Literal["events", "listen_ms", "session_starts"]


@dataclass(frozen=True)
class Aggregate:
    """A base quantity summed per tile: a count of events (optionally of some pages), the
    listening milliseconds of NextSong events, or the number of sessions started."""

    name: str
    measure: Measure
    pages: frozenset[str] | None = None  # None: every page
    description: str = ""


@dataclass(frozen=True)
class WindowFeature:
    """`aggregate` summed over `window`."""

    name: str
    aggregate: str
    window: Window
    description: str
    dtype: Literal["int", "float"] = "int"
    scale: float = 1.0  # e.g. ms -> seconds


@dataclass(frozen=True)
class Ratio:
    """`numerator / max(denominator, 1)` of two window features."""

    name: str
    numerator: str
    denominator: str
    description: str


@dataclass(frozen=True)
class Trend:
    """Recent rate vs earlier rate of one aggregate, smoothed:
    (recent + 1) * earlier_tiles / (earlier * recent_tiles + earlier_tiles), where earlier = long - recent
    counts the tiles of the long window before the recent one (e.g. 7d vs the 21d before)."""

    name: str
    recent: str  # a window feature, e.g. songs_7d
    long: str  # the same aggregate over a longer window, e.g. songs_28d
    description: str

    def tiles(self) -> tuple[int, int]:
        """Returns (recent tiles, earlier tiles) from the two features' windows."""
        windows = {f.name: f.window for f in WINDOW_FEATURES}
        recent, long = windows[self.recent], windows[self.long]
        return recent.tiles, long.tiles - recent.tiles


@dataclass(frozen=True)
class LatestEventFeature:
    """A property of the user's latest event or current session."""

    name: str
    kind: Literal["days_since_registration", "level_paid", "events_in_current_session"]
    description: str
    dtype: Literal["int", "float"] = "float"


@dataclass(frozen=True)
class RequestFeature:
    """Computed at request/score time from the injected clock `now`."""

    name: str
    description: str


def _pages(*names: str) -> frozenset[str]:
    return frozenset(names)


AGGREGATES: Final = (
    Aggregate("events", "events", None, "events of any page"),
    Aggregate("songs", "events", _pages("NextSong"), "songs played"),
    Aggregate("listen_ms", "listen_ms", _pages("NextSong"), "listening time of songs played"),
    Aggregate("sessions", "session_starts", None, "sessions started"),
    Aggregate("thumbs_up", "events", _pages("Thumbs Up"), "thumbs up given"),
    Aggregate("thumbs_down", "events", _pages("Thumbs Down"), "thumbs down given"),
    Aggregate("playlist_adds", "events", _pages("Add to Playlist"), "songs added to playlists"),
    Aggregate("friends_added", "events", _pages("Add Friend"), "friends added"),
    Aggregate("adverts", "events", _pages("Roll Advert"), "adverts rolled"),
    Aggregate("errors", "events", _pages("Error"), "error pages hit"),
    Aggregate("help_visits", "events", _pages("Help"), "help page visits"),
    Aggregate("settings_visits", "events", _pages("Settings", "Save Settings"), "settings visits"),
    Aggregate("downgrade_visits", "events", _pages("Downgrade", "Submit Downgrade"), "downgrade page visits"),
    Aggregate("upgrade_visits", "events", _pages("Upgrade", "Submit Upgrade"), "upgrade page visits"),
)


def _window_features() -> tuple[WindowFeature, ...]:
    described = {a.name: a.description for a in AGGREGATES}
    plan = {
        "events": (W1H, W24H, W7D, W28D),
        "songs": (W1H, W24H, W7D, W28D),
        "listen_ms": (W24H, W7D, W28D),
        "sessions": (W24H, W7D, W28D),
        "thumbs_up": (W7D, W28D),
        "thumbs_down": (W7D, W28D),
        "playlist_adds": (W7D, W28D),
        "friends_added": (W28D,),
        "adverts": (W7D, W28D),
        "errors": (W7D, W28D),
        "help_visits": (W7D, W28D),
        "settings_visits": (W28D,),
        "downgrade_visits": (W28D,),
        "upgrade_visits": (W28D,),
    }
    out = []
    for aggregate, windows in plan.items():
        for window in windows:
            if aggregate == "listen_ms":
                out.append(
                    WindowFeature(
                        f"listening_seconds_{window.name}", aggregate, window,
                        f"seconds of music played in the last {window.name}", dtype="float", scale=1e-3,
                    )
                )  # fmt: skip
            else:
                out.append(
                    WindowFeature(
                        f"{aggregate}_{window.name}", aggregate, window, f"{described[aggregate]} in {window.name}"
                    )
                )
    return tuple(out)


WINDOW_FEATURES: Final = _window_features()

RATIOS: Final = (
    Ratio("thumbs_down_per_song_28d", "thumbs_down_28d", "songs_28d", "thumbs down per song played, 28d"),
    Ratio("thumbs_up_per_song_28d", "thumbs_up_28d", "songs_28d", "thumbs up per song played, 28d"),
    Ratio("adverts_per_song_7d", "adverts_7d", "songs_7d", "adverts per song played, 7d"),
    Ratio("adverts_per_song_28d", "adverts_28d", "songs_28d", "adverts per song played, 28d"),
    Ratio("errors_per_session_28d", "errors_28d", "sessions_28d", "error pages per session, 28d"),
    Ratio("songs_per_session_28d", "songs_28d", "sessions_28d", "songs played per session, 28d"),
)

TRENDS: Final = (
    Trend("songs_trend_7d_vs_21d", "songs_7d", "songs_28d", "songs per day, last 7d vs the 21d before"),
    Trend("sessions_trend_7d_vs_21d", "sessions_7d", "sessions_28d", "sessions per day, last 7d vs the 21d before"),
)

LATEST: Final = (
    LatestEventFeature(
        "days_since_registration", "days_since_registration", "days from registration to the latest event"
    ),
    LatestEventFeature("level_paid", "level_paid", "1 if the latest event was on the paid level, else 0", dtype="int"),
    LatestEventFeature(
        "events_in_current_session", "events_in_current_session", "events so far in the latest session", dtype="int"
    ),
)

REQUEST: Final = (RequestFeature("seconds_since_last_event", "seconds from the latest event to now (request time)"),)

# Stored with every row (online store and training sets) but not a model input.
LAST_EVENT_MS: Final = "last_event_ms"

STORED_FEATURES: Final[tuple[str, ...]] = (
    *(f.name for f in WINDOW_FEATURES),
    *(r.name for r in RATIOS),
    *(t.name for t in TRENDS),
    *(f.name for f in LATEST),
)
MODEL_FEATURES: Final[tuple[str, ...]] = (*STORED_FEATURES, *(r.name for r in REQUEST))

INT_FEATURES: Final = frozenset(
    [f.name for f in WINDOW_FEATURES if f.dtype == "int"] + [f.name for f in LATEST if f.dtype == "int"]
)


def spec_version() -> str:
    """Returns a short hash of the spec; it changes whenever any definition changes."""
    # Page sets are sorted: frozenset order varies between processes (hash randomisation).
    aggregates = [(a.name, a.measure, sorted(a.pages or ()), a.description) for a in AGGREGATES]
    text = repr((aggregates, WINDOW_FEATURES, RATIOS, TRENDS, LATEST, REQUEST))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def describe() -> dict[str, str]:
    """Returns every model feature's name with its description (docs, API reasons)."""
    out: dict[str, str] = {}
    for group in (WINDOW_FEATURES, RATIOS, TRENDS, LATEST, REQUEST):
        for feature in group:
            out[feature.name] = feature.description
    return out
