"""What simulated users do inside a session: page actions, their expansion into events, and timing.

Each session draws i.i.d. actions from weights that mix the user's tastes, level, the hidden
dissatisfaction `d` of the day and the drift knob (see `action_weights`); a free user may quit right
after an advert, more readily when dissatisfied. Compound actions expand into several events
(Settings -> Save Settings, Upgrade -> Submit Upgrade, Logout -> logged-out Home -> Login).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from sim.catalog import Catalogue

# Every page the simulator emits, with its HTTP method and status as Sparkify logs them.
PAGES: Final = (
    ("NextSong", "PUT", 200), ("Home", "GET", 200), ("Thumbs Up", "PUT", 307), ("Thumbs Down", "PUT", 307),
    ("Add to Playlist", "PUT", 200), ("Add Friend", "PUT", 307), ("Roll Advert", "GET", 200),
    ("Settings", "GET", 200), ("Save Settings", "PUT", 307), ("Help", "GET", 200), ("Error", "GET", 404),
    ("About", "GET", 200), ("Upgrade", "GET", 200), ("Submit Upgrade", "PUT", 307), ("Downgrade", "GET", 200),
    ("Submit Downgrade", "PUT", 307), ("Logout", "PUT", 307), ("Login", "PUT", 307), ("Cancel", "PUT", 307),
    ("Cancellation Confirmation", "GET", 200),
)  # fmt: skip
PAGE_NAMES: Final = tuple(name for name, _, _ in PAGES)
PAGE_CODE: Final = {name: code for code, name in enumerate(PAGE_NAMES)}
METHOD_IS_PUT: Final = np.array([method == "PUT" for _, method, _ in PAGES])
STATUS: Final = np.array([status for _, _, status in PAGES], dtype=np.int64)

# action -> (pages for a free user, pages for a paid user, which of them are logged out)
_EXPANSION: Final = (
    ("song", ["NextSong"], ["NextSong"], [False]),
    ("home", ["Home"], ["Home"], [False]),
    ("thumbs_up", ["Thumbs Up"], ["Thumbs Up"], [False]),
    ("thumbs_down", ["Thumbs Down"], ["Thumbs Down"], [False]),
    ("playlist", ["Add to Playlist"], ["Add to Playlist"], [False]),
    ("friend", ["Add Friend"], ["Add Friend"], [False]),
    ("advert", ["Roll Advert"], ["Roll Advert"], [False]),
    ("settings", ["Settings"], ["Settings"], [False]),
    ("save_settings", ["Settings", "Save Settings"], ["Settings", "Save Settings"], [False, False]),
    ("help", ["Help"], ["Help"], [False]),
    ("error", ["Error"], ["Error"], [False]),
    ("about", ["About"], ["About"], [False]),
    ("plan_page", ["Upgrade"], ["Downgrade"], [False]),
    ("relogin", ["Logout", "Home", "Login"], ["Logout", "Home", "Login"], [False, True, True]),
    ("plan_change", ["Upgrade", "Submit Upgrade"], ["Downgrade", "Submit Downgrade"], [False, False]),
    ("logout", ["Logout"], ["Logout"], [False]),
)
ACTION: Final = {name: code for code, (name, _, _, _) in enumerate(_EXPANSION)}
_N_EVENTS = np.array([len(free) for _, free, _, _ in _EXPANSION])
_PAGE_OF = np.zeros((2, len(_EXPANSION), 3), dtype=np.int64)  # [paid, action, step]
_GUEST_OF = np.zeros((len(_EXPANSION), 3), dtype=bool)
for _code, (_, _free, _paid, _guest) in enumerate(_EXPANSION):
    _PAGE_OF[0, _code, : len(_free)] = [PAGE_CODE[p] for p in _free]
    _PAGE_OF[1, _code, : len(_paid)] = [PAGE_CODE[p] for p in _paid]
    _GUEST_OF[_code, : len(_guest)] = _guest

END_LOGOUT_SHARE = 0.2  # most sessions just time out, as in eventsim
AD_QUIT_BASE = 0.04  # chance to leave right after an advert at d = 0, average taste


@dataclass(slots=True)
class SessionPlan:
    """Sessions decided by the timeline (one row each): who, when, and the day's circumstances."""

    user: np.ndarray
    start_ms: np.ndarray
    paid: np.ndarray
    state: np.ndarray
    drifted: np.ndarray
    n_actions: np.ndarray
    plan_change: np.ndarray


@dataclass(slots=True)
class EventRows:
    """Events in session order: session row, item index, page code, guest flag, level, ts and song."""

    session: np.ndarray
    item: np.ndarray
    page: np.ndarray
    guest: np.ndarray
    paid: np.ndarray
    ts: np.ndarray
    song: np.ndarray


def action_weights(
    plan: SessionPlan, tastes: dict[str, np.ndarray], drift_strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (weights per session and action, probability of quitting after an advert per session).

    Dissatisfaction `d` raises thumbs down, help, settings, errors, downgrade visits and ad
    impatience, and lowers thumbs up, playlists and friends; each user's tastes add noise on top.
    Drift multiplies adverts by (1 + s) and errors by (1 + 2s) in drifted sessions.
    """
    d, paid, user = plan.state, plan.paid, plan.user
    drift = np.where(plan.drifted, drift_strength, 0.0)
    weights = np.zeros((len(d), len(_EXPANSION)))
    weights[:, ACTION["song"]] = 80.0
    weights[:, ACTION["home"]] = 5.0
    weights[:, ACTION["thumbs_up"]] = 4.4 * tastes["thumbs"][user] * np.exp(-0.3 * d)
    weights[:, ACTION["thumbs_down"]] = 0.9 * tastes["thumbs"][user] * np.exp(0.5 * d)
    weights[:, ACTION["playlist"]] = 2.3 * tastes["playlist"][user] * np.exp(-0.25 * d)
    weights[:, ACTION["friend"]] = 1.5 * tastes["social"][user] * np.exp(-0.3 * d)
    weights[:, ACTION["advert"]] = np.where(paid, 0.08, 6.0) * (1 + drift)
    weights[:, ACTION["settings"]] = 0.5 * np.exp(0.3 * d)
    weights[:, ACTION["save_settings"]] = 0.1 * np.exp(0.3 * d)
    weights[:, ACTION["help"]] = 0.55 * np.exp(0.4 * d)
    weights[:, ACTION["error"]] = 0.09 * tastes["errors"][user] * np.exp(0.3 * d) * (1 + 2 * drift)
    weights[:, ACTION["about"]] = 0.3
    weights[:, ACTION["plan_page"]] = np.where(paid, 0.6 * np.exp(0.4 * d), 0.9 * np.exp(-0.2 * d))
    weights[:, ACTION["relogin"]] = 1.0
    ad_quit = np.minimum(0.9, AD_QUIT_BASE * tastes["ad_quit"][user] * np.exp(0.7 * d))
    return weights, ad_quit


def session_events(
    plan: SessionPlan,
    tastes: dict[str, np.ndarray],
    catalogue: Catalogue,
    drift_strength: float,
    rng: np.random.Generator,
) -> EventRows:
    """Returns the events of every planned session, in session order, timed from each session start."""
    n_sessions = len(plan.user)
    weights, ad_quit = action_weights(plan, tastes, drift_strength)
    cumulative = np.cumsum(weights / weights.sum(1, keepdims=True), 1)
    cumulative[:, -1] = 1.0
    session = np.repeat(np.arange(n_sessions), plan.n_actions)
    position = np.arange(len(session)) - np.repeat(np.cumsum(plan.n_actions) - plan.n_actions, plan.n_actions)
    # One searchsorted over all sessions: shift session i's cumulative weights into [i, i + 1).
    n_kinds = weights.shape[1]
    flat = (cumulative + np.arange(n_sessions)[:, None]).ravel()
    action = np.searchsorted(flat, rng.random(len(session)) + session, side="right") - session * n_kinds
    action = np.minimum(action, n_kinds - 1)

    # A session ends at the first advert the user will not sit through.
    last = plan.n_actions - 1
    quits = (action == ACTION["advert"]) & (rng.random(len(session)) < ad_quit[session])
    np.minimum.at(last, session[quits], position[quits])
    keep = position <= last[session]
    session, position, action = session[keep], position[keep], action[keep]
    kept = last + 1
    first = np.cumsum(kept) - kept

    change_at = np.floor(rng.random(n_sessions) * kept).astype(np.int64)
    action[(first + change_at)[plan.plan_change]] = ACTION["plan_change"]
    closing = (rng.random(n_sessions) < END_LOGOUT_SHARE) & ~plan.plan_change
    action[(first + last)[closing]] = ACTION["logout"]

    count = _N_EVENTS[action]
    of_action = np.repeat(np.arange(len(action)), count)
    step = np.arange(len(of_action)) - np.repeat(np.cumsum(count) - count, count)
    ev_session = session[of_action]
    start_paid = plan.paid[ev_session]
    page = _PAGE_OF[start_paid.astype(np.int64), action[of_action], step]
    guest = _GUEST_OF[action[of_action], step]
    # The level switches right after the Submit Upgrade/Downgrade event, as in Sparkify.
    switched = plan.plan_change[ev_session] & (position[of_action] > change_at[ev_session])
    paid = start_paid ^ switched
    page[(page == PAGE_CODE["Roll Advert"]) & paid & switched] = PAGE_CODE["Home"]

    is_song = page == PAGE_CODE["NextSong"]
    song = np.full(len(page), -1, dtype=np.int64)
    song[is_song] = catalogue.draw(int(is_song.sum()), rng)
    # A song event is logged when it starts; the next event comes when it ends.
    dwell_s = np.where(is_song, np.round(catalogue.length[song]), np.round(1 + rng.exponential(12.0, len(page))))
    elapsed = np.cumsum(dwell_s.astype(np.int64) * 1000) - dwell_s.astype(np.int64) * 1000
    per_session = np.bincount(ev_session, minlength=n_sessions)
    session_first = np.cumsum(per_session) - per_session
    item = np.arange(len(page)) - session_first[ev_session]
    ts = plan.start_ms[ev_session] + elapsed - elapsed[session_first[ev_session]]
    return EventRows(ev_session, item, page, guest, paid, ts, song)
