"""A seeded population of Sparkify-style listeners and their event log, with the hidden truth.

`simulate(SimConfig(...))` returns a `Simulation`: the events (wire-format columns, sorted by ts) and
the `GroundTruth` (hidden states, churn times). Same config and seed -> identical output.

How the hidden dissatisfaction `d` (see `sim.ground_truth`) shows before churn, always mixed
with per-user tastes and sampling noise, never in one field:
- sessions come less often (median gap x exp(0.45 d)) and are shorter (actions x exp(-0.3 d));
- page mix: more Thumbs Down, Help, Settings, Error and Downgrade visits, fewer Thumbs Up,
  Add to Playlist and Add Friend (`sim.pages.action_weights`);
- free users quit after an advert more readily; upgrades get rarer, downgrades likelier.
Churn itself depends on `d` only: at the churn time the user emits Cancel and Cancellation
Confirmation (inside the session under way, or in a short session of its own), then nothing.

Drift (`drift_at`, strength s): in sessions starting at or after `drift_at`, every user performs
1 / (1 + 0.5 s) as many actions per session (fewer songs), sees Roll Advert weight x (1 + s) and
Error weight x (1 + 2 s). Hidden states, hazards, churn times, the population and the session
timeline are unchanged, so the truth and the oracle are identical with and without drift.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import polars as pl

from core.errors import InvalidInputError
from core.timeutil import DAY_MS
from events.schema import Event
from sim.catalog import build_catalogue
from sim.frame import event_frame
from sim.ground_truth import Dynamics, GroundTruth
from sim.pages import PAGE_CODE, EventRows, SessionPlan, session_events
from sim.population import Population, build_population

NEW_USER_SHIFT = 0.5  # newcomers start more dissatisfied: early-tenure churn is higher in real services
ACTION_MS = 200_000  # planning estimate of one action's duration, to space the next session
RETRY_MEAN_MS = 90 * 60_000  # after an off-peak moment the user reconsiders about 1.5 h later
UPGRADE_RATE, DOWNGRADE_RATE = 0.012, 0.006  # per session at d = 0
ACTIONS_SIGMA, GAP_SIGMA = 0.8, 1.0  # lognormal spreads: heavy-tailed session lengths and gaps


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What to simulate. `start` must be timezone-aware; it is floored to UTC midnight."""

    users: int = 1000
    days: int = 60
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    seed: int = 0
    churn_level: float = 1.0
    drift_at: datetime | None = None
    drift_strength: float = 1.0
    new_user_share: float = 0.25
    dynamics: Dynamics = field(default_factory=Dynamics)


@dataclass(slots=True)
class Simulation:
    """The simulated event log (wire-format columns sorted by ts; guests have userId "") and its truth."""

    events: pl.DataFrame
    truth: GroundTruth

    def to_events(self) -> list[Event]:
        """Returns the events as `Event` structs in ts order (guests included, with userId "")."""
        return msgspec.convert(self.events.to_dicts(), list[Event])

    def write_events(self, path: Path, chunk_rows: int = 500_000) -> None:
        """Writes JSON Lines in ts order, gzip-compressed when `path` ends with .gz."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as raw:
            # Level 3: several times faster than the default for a few percent more bytes.
            out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0) if path.suffix == ".gz" else raw
            for offset in range(0, self.events.height, chunk_rows):
                out.write(self.events.slice(offset, chunk_rows).write_ndjson().encode())
            out.close() if out is not raw else None


def _check(config: SimConfig) -> tuple[int, int | None]:
    if config.users < 1 or config.days < 1:
        msg = f"users and days must be at least 1, got users={config.users}, days={config.days}"
        raise InvalidInputError(msg)
    if config.churn_level < 0 or config.drift_strength < 0 or not 0 <= config.new_user_share <= 1:
        msg = "churn_level and drift_strength must be >= 0 and new_user_share in [0, 1]"
        raise InvalidInputError(msg)
    for name, moment in (("start", config.start), ("drift_at", config.drift_at)):
        if moment is not None and moment.tzinfo is None:
            msg = f"{name} must be timezone-aware, got {moment.isoformat()}"
            raise InvalidInputError(msg)
    start_ms = int(config.start.timestamp()) // 86_400 * DAY_MS
    return start_ms, None if config.drift_at is None else int(config.drift_at.timestamp() * 1000)


def _hidden_states(dyn: Dynamics, reg_day: np.ndarray, days: int, rng: np.random.Generator) -> np.ndarray:
    """Returns the daily hidden state, NaN before each user's registration day."""
    current = dyn.stationary(len(reg_day), rng)
    newcomer = dyn.stationary(len(reg_day), rng) + NEW_USER_SHIFT
    state = np.empty((len(reg_day), days))
    for day in range(days):
        current = dyn.step(current, rng) if day else current
        joining = reg_day == day
        current[joining] = newcomer[joining]
        state[:, day] = current
    state[reg_day[:, None] > np.arange(days)[None, :]] = np.nan
    return state


def _cancel_times(
    dyn: Dynamics, state: np.ndarray, reg_ms: np.ndarray, start_ms: int, rng: np.random.Generator
) -> np.ndarray:
    """Returns each user's Cancel time (epoch ms, -1 if none): the first time the integrated hazard
    exceeds an Exp(1) draw, hazard constant within a day and counted from registration."""
    days = state.shape[1]
    day_start = start_ms + np.arange(days, dtype=np.int64) * DAY_MS
    exposure = np.clip((day_start[None, :] + DAY_MS - reg_ms[:, None]) / DAY_MS, 0.0, 1.0)
    hazard = np.nan_to_num(dyn.hazard(state))
    cumulative = np.cumsum(hazard * exposure, 1)
    need = rng.exponential(1.0, len(reg_ms))
    crossed = cumulative >= need[:, None]
    day = crossed.argmax(1)
    rows = np.arange(len(reg_ms))
    before = np.where(day > 0, cumulative[rows, day - 1], 0.0)
    since = np.maximum(day_start[day], reg_ms)
    with np.errstate(divide="ignore", invalid="ignore"):
        cancel = since + (need - before) / hazard[rows, day] * DAY_MS
    ok = crossed.any(1) & (cancel < day_start[-1] + DAY_MS - 60_000)  # room for the confirmation
    return np.where(ok, np.floor(cancel / 1000) * 1000, -1).astype(np.int64)


def _plan_sessions(
    pop: Population, state: np.ndarray, cancel: np.ndarray, start_ms: int, drift_ms: int | None,
    config: SimConfig, rng: np.random.Generator,
) -> SessionPlan:  # fmt: skip
    """Returns the session timeline of every user (all users advance together, one candidate each round).

    Candidate times follow a renewal process with lognormal gaps; a candidate becomes a session with
    probability given by the user's diurnal and weekly rhythm (local time), else the user retries later.
    """
    stop = np.where(cancel >= 0, cancel, start_ms + config.days * DAY_MS)
    t = np.where(pop.is_new, pop.registration_ms, start_ms + rng.random(len(stop)) * pop.gap_days * DAY_MS)
    t = (t // 1000 * 1000).astype(np.int64)
    forced, paid = pop.is_new.copy(), pop.paid.copy()
    rounds: list[tuple[np.ndarray, ...]] = []
    while (active := np.flatnonzero(t < stop)).size:
        when = t[active]
        d = state[active, (when - start_ms) // DAY_MS]
        local_ms = when + pop.utc_offset_h[active] * 3_600_000
        hour = (local_ms % DAY_MS) / 3_600_000
        weekend = (local_ms // DAY_MS + 3) % 7 >= 5  # 1970-01-01 was a Thursday
        diurnal = np.exp(1.3 * (np.cos(2 * np.pi * (hour - pop.peak_hour[active]) / 24) - 1))
        weekly = np.where(weekend, pop.weekend[active], 1.0) / np.maximum(pop.weekend[active], 1.0)
        accept = forced[active] | (rng.random(active.size) < diurnal * weekly)
        forced[active] = False
        users, d = active[accept], d[accept]
        drifted = np.zeros(users.size, bool) if drift_ms is None else t[users] >= drift_ms
        mean_actions = pop.actions[users] * np.exp(-0.3 * d) / np.where(drifted, 1 + 0.5 * config.drift_strength, 1)
        n_actions = 1 + np.floor(rng.lognormal(np.log(mean_actions) - ACTIONS_SIGMA**2 / 2, ACTIONS_SIGMA)).astype(int)
        rate = np.where(
            paid[users], DOWNGRADE_RATE * np.exp(0.6 * d), UPGRADE_RATE * pop.upgrade[users] * np.exp(-0.6 * d)
        )
        change = rng.random(users.size) < rate
        rounds.append((users, t[users].copy(), paid[users].copy(), d, drifted, n_actions, change))
        paid[users] ^= change
        gap = rng.lognormal(np.log(pop.gap_days[users] * DAY_MS) + 0.45 * d, GAP_SIGMA)
        t[users] += n_actions * ACTION_MS + np.maximum(gap, 300_000).astype(np.int64) // 1000 * 1000
        retry = active[~accept]
        t[retry] += (1 + rng.exponential(RETRY_MEAN_MS, retry.size)).astype(np.int64) // 1000 * 1000
    cols = [np.concatenate(col) for col in zip(*rounds, strict=True)] if rounds else [np.zeros(0, int)] * 7
    order = np.lexsort((cols[1], cols[0]))  # by user, then start
    return SessionPlan(*(col[order] for col in cols))


def _cancellations(
    rows: EventRows, plan: SessionPlan, cancel: np.ndarray, pop: Population, end_ms: int
) -> tuple[EventRows, SessionPlan]:
    """Returns rows cut at each user's next session, the window end and the Cancel time, plus Cancel and
    Cancellation Confirmation events: inside the session under way, else in a short session of their own."""
    user = plan.user
    same_user_next = np.append(user[1:] == user[:-1], False)
    next_start = np.where(same_user_next, np.roll(plan.start_ms, -1), end_ms + 1000)
    keep = rows.ts < np.minimum(next_start, end_ms + 1000)[rows.session] - 1000
    rows = EventRows(*(col[keep] for col in _columns(rows)))
    # Per session: its last event before the Cancel cut, to know whether the user is mid-session.
    last_ts = np.full(len(user), -1, dtype=np.int64)
    np.maximum.at(last_ts, rows.session, rows.ts)
    user_cancel = cancel[user[rows.session]]
    keep = (user_cancel < 0) | (rows.ts < user_cancel)
    rows = EventRows(*(col[keep] for col in _columns(rows)))

    churners = np.flatnonzero(cancel >= 0)
    at = cancel[churners]
    key = user.astype(np.int64) * (1 << 42) + plan.start_ms
    prior = np.searchsorted(key, churners * (1 << 42) + at, side="right") - 1
    has_prior = (prior >= 0) & (user[np.maximum(prior, 0)] == churners)
    prior = np.where(has_prior, prior, 0)
    ongoing = has_prior & (last_ts[prior] >= at)
    items_before = np.bincount(rows.session, minlength=len(user))[prior]
    level_after = np.where(has_prior, plan.paid[prior] ^ plan.plan_change[prior], pop.paid[churners])
    # Sessions of their own for the rest: Home, then Cancel and Confirmation a few seconds later.
    own = churners[~ongoing]
    new_session = len(user) + np.arange(own.size)
    n_new = own.size
    plan = SessionPlan(
        np.concatenate([user, own]), np.concatenate([plan.start_ms, at[~ongoing]]),
        np.concatenate([plan.paid, level_after[~ongoing]]), np.concatenate([plan.state, np.full(n_new, np.nan)]),
        np.concatenate([plan.drifted, np.zeros(n_new, bool)]), np.concatenate([plan.n_actions, np.zeros(n_new, int)]),
        np.concatenate([plan.plan_change, np.zeros(n_new, bool)]),
    )  # fmt: skip
    in_session = prior[ongoing]
    level_now = np.where(ongoing, plan.paid[prior] ^ plan.plan_change[prior], level_after)
    extra_session = np.concatenate([in_session, in_session, new_session, new_session, new_session])
    extra_item = np.concatenate(
        [items_before[ongoing], items_before[ongoing] + 1, np.zeros(n_new, int), np.ones(n_new, int), np.full(n_new, 2)]
    )
    cancel_page, confirm_page, home = PAGE_CODE["Cancel"], PAGE_CODE["Cancellation Confirmation"], PAGE_CODE["Home"]
    extra_page = np.repeat([cancel_page, confirm_page, home, cancel_page, confirm_page], _sizes(ongoing, n_new))
    on_at, own_at = at[ongoing], at[~ongoing]
    extra_ts = np.concatenate([on_at, on_at + 1000, own_at, own_at + 8000, own_at + 9000])
    extra_paid = np.concatenate([level_now[ongoing], level_now[ongoing], *[level_after[~ongoing]] * 3])
    extra = EventRows(
        extra_session, extra_item, extra_page, np.zeros(extra_ts.size, bool), extra_paid.astype(bool), extra_ts,
        np.full(extra_ts.size, -1, dtype=np.int64),
    )  # fmt: skip
    merged = EventRows(*(np.concatenate([a, b]) for a, b in zip(_columns(rows), _columns(extra), strict=True)))
    return merged, plan


def _sizes(ongoing: np.ndarray, n_new: int) -> list[int]:
    n_on = int(ongoing.sum())
    return [n_on, n_on, n_new, n_new, n_new]


def _columns(rows: EventRows) -> tuple[np.ndarray, ...]:
    return (rows.session, rows.item, rows.page, rows.guest, rows.paid, rows.ts, rows.song)


def simulate(config: SimConfig) -> Simulation:
    """Returns the simulated events (sorted by ts) and their ground truth; deterministic in `config`.

    Raises:
        InvalidInputError: a config value is out of range or a datetime is naive.
    """
    start_ms, drift_ms = _check(config)
    end_ms = start_ms + config.days * DAY_MS
    # Independent streams: changing the drift never changes the population, hidden paths or churn.
    streams = np.random.SeedSequence(config.seed).spawn(6)
    pop_rng, state_rng, churn_rng, plan_rng, page_rng, catalogue_rng = (np.random.default_rng(s) for s in streams)
    dyn = replace(config.dynamics, churn_level=config.churn_level)
    pop = build_population(config.users, config.days, start_ms, config.new_user_share, pop_rng)
    reg_day = np.floor_divide(pop.registration_ms - start_ms, DAY_MS)
    state = _hidden_states(dyn, reg_day, config.days, state_rng)
    cancel = _cancel_times(dyn, state, pop.registration_ms, start_ms, churn_rng)
    plan = _plan_sessions(pop, state, cancel, start_ms, drift_ms, config, plan_rng)
    catalogue = build_catalogue(catalogue_rng)
    rows = session_events(plan, pop.tastes, catalogue, config.drift_strength, page_rng)
    rows, plan = _cancellations(rows, plan, cancel, pop, end_ms)

    session_id = np.empty(len(plan.user), dtype=np.int64)
    session_id[np.lexsort((plan.user, plan.start_ms))] = np.arange(1, len(plan.user) + 1)
    user = plan.user[rows.session]
    # Stable: equal timestamps keep session order, and each session's events are already in item order.
    order = np.argsort(rows.ts, kind="stable")
    rows = EventRows(*(col[order] for col in _columns(rows)))
    user = user[order]

    logged_in = ~rows.guest
    day = (rows.ts[logged_in] - start_ms) // DAY_MS
    per_day = np.bincount(user[logged_in] * config.days + day, minlength=config.users * config.days)
    confirmed = rows.page == PAGE_CODE["Cancellation Confirmation"]
    churn_ms = np.full(config.users, -1, dtype=np.int64)
    churn_ms[user[confirmed]] = rows.ts[confirmed]
    churn_day = np.where(churn_ms >= 0, (churn_ms - start_ms) // DAY_MS, config.days)
    state[np.arange(config.days)[None, :] > churn_day[:, None]] = np.nan
    truth = GroundTruth(
        dynamics=dyn, start_ms=start_ms, days=config.days, user_ids=pop.user_ids,
        registration_ms=pop.registration_ms, churn_ms=churn_ms, state=state,
        events_per_day=per_day.reshape(config.users, config.days).astype(np.int32),
    )  # fmt: skip
    frame = event_frame(
        rows.ts, user, session_id[rows.session], rows.item, rows.page, rows.guest, rows.paid, rows.song, pop, catalogue
    )
    return Simulation(frame, truth)


def truth_path_for(events_path: Path) -> Path:
    """Returns the default ground-truth path next to an events file: events.jsonl.gz -> events.truth.parquet."""
    stem = events_path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return events_path.with_name(f"{stem}.truth.parquet")
