"""Online (incremental) feature engine: per-user tiles on event time, updated event by event.

Each user's state keeps, per tile granularity of the spec, the sums of the aggregates that
granularity needs, the start and size of recent sessions, the latest event, and the last
applied Kafka offset per partition. The tiles of a granularity live in one flat ring buffer
with room for the longest window plus the allowed lateness: a tile index always maps to the
same record, and a newer tile overwrites the expired one there, so no raw events are stored
and no tile is allocated or freed after the state is created (measured: allocating and
pruning a list per tile cost about a quarter of `apply`, through the allocator and the
cyclic collector). The row is built as of the user's latest event, with the semantics
documented in `features.spec`.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress
from typing import Final

import msgspec

from events.schema import CHURN_PAGE, Event
from features import spec
from features.store import FeatureRow

DUPLICATE: Final = 0
APPLIED: Final = 1
LATE: Final = 2
# At most this many sessions are remembered per user (bounded state and Redis memory, whatever a
# client sends). Sessions are forgotten by age first (older than the longest window + lateness);
# past the cap, the earliest-started ones go. A real user has far fewer in 29 days (the simulated
# heavy users ~150); only a forgotten session that gets another event would be counted as a new
# start, where the offline engine (which keeps every session) counts it once.
MAX_SESSIONS: Final = 256


class UserState(msgspec.Struct, gc=False, array_like=True):
    """Everything the engine remembers of one user (serialised with msgpack between runs).

    `tiles[g]` is granularity g's ring of `keep_tiles` records of `1 + len(slots)` ints: the
    tile index the record holds (-1: none yet), then the sums of the granularity's slots. Tile
    i lives in record `i % keep_tiles`;
    `sessions` maps a session id to [first event ts, events seen]; `offsets` maps a Kafka
    partition to the last offset applied for this user (replays at or below it are skipped);
    `cancelled_ms` is the event time of the user's (earliest applied) `Cancellation
    Confirmation`, -1 while they have not cancelled (a cancelled user is no longer scored);
    `tier` is the risk tier last announced for the user (`stream.changes`).
    """

    last_ts: int = -1
    last_session: int = -1
    last_item: int = -1
    level_paid: int = 0
    registration: float | None = None
    tiles: list[list[int]] = msgspec.field(default_factory=list)
    sessions: dict[int, list[int]] = msgspec.field(default_factory=dict)
    offsets: dict[int, int] = msgspec.field(default_factory=dict)
    cancelled_ms: int = -1  # with a default: states saved before it decode unchanged
    # The risk tier last announced on the tier-change topic ("" before the first score, and once
    # cancelled): saved with the applied offsets, so a replayed batch finds what it announced.
    tier: str = ""


@dataclass(frozen=True)
class _Granularity:
    """What one tile granularity tracks: the slot layout and the windows evaluated on it."""

    ms: int
    slots: tuple[str, ...]  # aggregate names, one list position each
    page_slots: dict[str, tuple[int, ...]]  # page -> positions of page-filtered counts
    events_slot: int  # -1 if not tracked at this granularity
    listen_slot: int
    session_slot: int
    window_tiles: tuple[int, ...]  # distinct window lengths (in tiles) evaluated here
    keep_tiles: int  # tiles kept behind the current one (longest window + lateness)


@dataclass(frozen=True)
class _Plan:
    granularities: tuple[_Granularity, ...]
    # (feature name, granularity index, window tiles, slot position, scale, is int)
    window_features: tuple[tuple[str, int, int, int, float, bool], ...]


def _build_plan(lateness_ms: int) -> _Plan:
    aggregates = {a.name: a for a in spec.AGGREGATES}
    by_ms: dict[int, list[spec.WindowFeature]] = {}
    for feature in spec.WINDOW_FEATURES:
        by_ms.setdefault(feature.window.granularity_ms, []).append(feature)
    granularities = []
    window_features = []
    for gi, (ms, features) in enumerate(sorted(by_ms.items())):
        slots = tuple(dict.fromkeys(f.aggregate for f in features))
        page_slots: dict[str, list[int]] = {}
        for pos, name in enumerate(slots):
            agg = aggregates[name]
            if agg.measure == "events" and agg.pages is not None:
                for page in agg.pages:
                    page_slots.setdefault(page, []).append(pos)

        def slot_of(measure: str, slots: tuple[str, ...] = slots) -> int:
            matches = [
                i for i, n in enumerate(slots) if aggregates[n].measure == measure and aggregates[n].pages is None
            ]
            return matches[0] if matches else -1

        listen = [i for i, n in enumerate(slots) if aggregates[n].measure == "listen_ms"]
        window_tiles = tuple(sorted({f.window.tiles for f in features}))
        granularities.append(
            _Granularity(
                ms=ms,
                slots=slots,
                page_slots={page: tuple(pos) for page, pos in page_slots.items()},
                events_slot=slot_of("events"),
                listen_slot=listen[0] if listen else -1,
                session_slot=slot_of("session_starts"),
                window_tiles=window_tiles,
                keep_tiles=max(window_tiles) + -(-lateness_ms // ms),
            )
        )
        for f in features:
            window_features.append((f.name, gi, f.window.tiles, slots.index(f.aggregate), f.scale, f.dtype == "int"))
    return _Plan(tuple(granularities), tuple(window_features))


class OnlineEngine:
    """Applies events to user states and builds feature rows; no I/O.

    `states` is the working set; the caller loads a user's saved state into it (with
    `states[user] = state`) before applying that user's events, and saves it afterwards.
    """

    def __init__(self, lateness_ms: int = 3_600_000) -> None:
        self.lateness_ms = lateness_ms
        self.plan = _build_plan(lateness_ms)
        self.state_layout = state_layout(lateness_ms)
        self.states: dict[str, UserState] = {}
        self._session_keep_ms = max(w.size_ms for w in spec.WINDOWS) + lateness_ms
        # The hot paths read plain tuples, not dataclass attributes (measured: about half of
        # `apply`'s time went to attribute and dict lookups on `_Granularity`).
        grans = self.plan.granularities
        # Positions inside a ring record are slot + 1 (the record starts with its tile index);
        # 0 stands for "not tracked at this granularity".
        self._tile_plan = tuple(
            (gi, g.ms, g.keep_tiles, len(g.slots) + 1, [0] * len(g.slots), g.listen_slot + 1, g.session_slot + 1)
            for gi, g in enumerate(grans)
        )
        self._empty_rings = tuple(([-1] + [0] * len(g.slots)) * g.keep_tiles for g in grans)
        # page -> per granularity, the record positions one event of that page adds 1 to
        # (events + page counts).
        pages = set(spec_pages()) | {p for g in grans for p in g.page_slots}
        self._count_slots: dict[str, tuple[tuple[int, ...], ...]] = {
            page: tuple(_counted(g, page) for g in grans) for page in pages
        }
        self._other_page_slots = tuple(_counted(g, None) for g in grans)
        # Per granularity: its index, tile size, record length, each ring record's sums as a
        # slice, its slots' zero sums and window lengths (ascending).
        self._row_plan = tuple(
            (gi, g.ms, len(g.slots) + 1, _record_sums(g.keep_tiles, len(g.slots) + 1), [0] * len(g.slots),
             g.window_tiles)
            for gi, g in enumerate(grans)
        )  # fmt: skip
        # Where each window feature sits in `row`'s flat list of sums (granularities in order,
        # windows ascending, slots in order), picked in C by one itemgetter.
        flat_base: dict[tuple[int, int], int] = {}
        base = 0
        for gi, g in enumerate(grans):
            for n in g.window_tiles:
                flat_base[(gi, n)] = base
                base += len(g.slots)
        features = self.plan.window_features
        self._window_names = tuple(name for name, *_ in features)
        picks = [flat_base[(gi, n)] + pos for _, gi, n, pos, _, _ in features]
        self._pick_windows = operator.itemgetter(*picks) if len(picks) > 1 else lambda flat: (flat[picks[0]],)
        self._scaled = tuple((name, scale) for name, _, _, _, scale, is_int in features if not is_int)

    def new_state(self) -> UserState:
        """Returns an empty state with one empty tile ring per granularity."""
        return UserState(tiles=[list(ring) for ring in self._empty_rings])

    def apply(self, event: Event, partition: int = -1, offset: int = -1) -> int:
        """Applies one event to its user's state (created if absent).

        Returns APPLIED, DUPLICATE (offset already applied for this user and partition) or
        LATE (older than the user's latest event by more than the allowed lateness; ignored).
        """
        state = self.states.get(event.user_id)
        if state is None:
            state = self.states[event.user_id] = self.new_state()
        if offset >= 0:
            offsets = state.offsets
            if offset <= offsets.get(partition, -1):
                return DUPLICATE
            offsets[partition] = offset
        ts = event.ts
        last_ts = state.last_ts
        if ts < last_ts - self.lateness_ms:
            return LATE
        session_id = event.session_id
        # (ts, session, item) > latest, without building two tuples per event.
        if ts > last_ts or (
            ts == last_ts
            and (
                session_id > state.last_session
                or (session_id == state.last_session and event.item_in_session > state.last_item)
            )
        ):
            state.last_ts, state.last_session, state.last_item = ts, session_id, event.item_in_session
            state.level_paid = 1 if event.level == "paid" else 0
            state.registration = event.registration

        # Sessions count where they start; a late event may move a session's start earlier.
        sessions = state.sessions
        session = sessions.get(session_id)
        moved_from = -1
        if session is None:
            if len(sessions) > 16:
                self._prune_sessions(state)
            sessions[session_id] = [ts, 1]
            session_started = True
        else:
            session[1] += 1
            session_started = False
            if ts < session[0]:
                moved_from, session[0] = session[0], ts
                session_started = True

        page = event.page
        if page == CHURN_PAGE and (state.cancelled_ms < 0 or ts < state.cancelled_ms):
            state.cancelled_ms = ts
        count_slots = self._count_slots.get(page, self._other_page_slots)
        length = event.length
        listen_ms = round(length * 1000) if (length is not None and page == "NextSong") else 0
        all_tiles = state.tiles
        for gi, ms, keep, stride, zeros, listen_pos, session_pos in self._tile_plan:
            ring = all_tiles[gi]
            index = ts // ms
            at = index % keep * stride
            if ring[at] != index:
                # The record holds an expired tile (index - k * keep) or none: this tile starts.
                # It never holds a newer one: accepted events are within the lateness, and the
                # ring spans the longest window plus the lateness.
                ring[at] = index
                ring[at + 1 : at + stride] = zeros
            for pos in count_slots[gi]:
                ring[at + pos] += 1
            if listen_ms and listen_pos:
                ring[at + listen_pos] += listen_ms
            if session_started and session_pos:
                ring[at + session_pos] += 1
                if moved_from >= 0:
                    old_index = moved_from // ms
                    old_at = old_index % keep * stride
                    if ring[old_at] == old_index:  # else expired: outside every window already
                        ring[old_at + session_pos] -= 1
        return APPLIED

    def _prune_sessions(self, state: UserState) -> None:
        """Forgets sessions that started before the longest window + lateness; past
        `MAX_SESSIONS`, also the earliest-started ones (never the latest), down to 3/4 of the cap."""
        sessions = state.sessions
        horizon = state.last_ts - self._session_keep_ms
        for session_id in [s for s, (start, _) in sessions.items() if start < horizon]:
            del sessions[session_id]
        if len(sessions) >= MAX_SESSIONS:
            by_start = sorted((start, s) for s, (start, _) in sessions.items() if s != state.last_session)
            for _, session_id in by_start[: len(sessions) - MAX_SESSIONS * 3 // 4]:
                del sessions[session_id]

    def apply_all(self, events: Iterable[Event]) -> None:
        """Applies events without Kafka positions (files, tests)."""
        for event in events:
            self.apply(event)

    def row(self, user_id: str) -> FeatureRow:
        """Returns the user's feature row as of their latest event.

        Raises:
            KeyError: the engine holds no state for `user_id`.
        """
        state = self.states[user_id]
        last = state.last_ts
        # Each window sums its own tiles, in C (`map(sum, zip)` over the picked records).
        # `flat` is every window's slot sums, one after the other.
        flat: list[int] = []
        all_tiles = state.tiles
        for gi, ms, stride, record_sums, zeros, windows in self._row_plan:
            current = last // ms
            ring = all_tiles[gi]
            held = ring[::stride]  # the tile index each record holds
            for n in windows:
                # Window n is tiles (current - n, current]; no tile is newer than the latest
                # event's, so one comparison per record picks them, in C.
                in_window = compress(record_sums, map((current - n).__lt__, held))
                bucket = list(map(ring.__getitem__, in_window))
                if len(bucket) == 1:  # common for long windows of occasional users: no sums
                    flat += bucket[0]
                else:
                    flat += map(sum, zip(*bucket, strict=True)) if bucket else zeros
        values: dict[str, float] = dict(zip(self._window_names, self._pick_windows(flat), strict=True))
        for name, scale in self._scaled:
            values[name] *= scale
        for name, numerator, denominator in _RATIOS:
            denominator_value = values[denominator]  # max(d, 1) without a call
            values[name] = values[numerator] / (denominator_value if denominator_value > 1 else 1)
        for name, recent_name, long_name, recent_tiles, earlier_tiles in _TRENDS:
            recent = values[recent_name]
            earlier = values[long_name] - recent
            # Integer arithmetic up to one division: both engines round exactly once, identically.
            values[name] = (recent + 1) * earlier_tiles / (earlier * recent_tiles + earlier_tiles)
        registration = state.registration
        values["days_since_registration"] = (
            (last - registration) * spec.DAYS_PER_MS if registration is not None else float("nan")
        )
        values["level_paid"] = state.level_paid
        current_session = state.sessions.get(state.last_session)
        values["events_in_current_session"] = current_session[1] if current_session else 0
        return FeatureRow(user_id, last, values)


def state_layout(lateness_ms: int) -> str:
    """Returns a short tag of the state layout of engines with this lateness: granularities, ring
    sizes, and what each slot sums (its aggregate's measure and pages, not only its name: an
    edited definition under the same name reused the saved sums with the old meaning). Saved
    states are keyed by it, so a changed spec or lateness never reads a state laid out for
    another: those users start empty until `churn materialize` rebuilds them."""
    aggregates = {a.name: a for a in spec.AGGREGATES}
    shape = [
        (g.ms, g.keep_tiles, [(n, aggregates[n].measure, sorted(aggregates[n].pages or ())) for n in g.slots])
        for g in _build_plan(lateness_ms).granularities
    ]
    return "r" + hashlib.blake2b(repr(shape).encode(), digest_size=4).hexdigest()


def spec_pages() -> frozenset[str]:
    """Returns every page some aggregate of the spec filters on."""
    return frozenset(page for a in spec.AGGREGATES for page in (a.pages or ()))


def _record_sums(keep: int, stride: int) -> tuple[slice, ...]:
    """Returns, for each record of a ring of `keep` records of `stride` ints, its sums' slice."""
    return tuple(slice(at + 1, at + stride) for at in range(0, keep * stride, stride))


def _counted(g: _Granularity, page: str | None) -> tuple[int, ...]:
    """Returns the ring-record positions (slot + 1) of `g` one event of `page` adds 1 to (None:
    a page no aggregate names)."""
    slots = [g.events_slot] if g.events_slot >= 0 else []
    if page is not None:
        slots.extend(g.page_slots.get(page, ()))
    return tuple(slot + 1 for slot in slots)


# The derived features of the spec as plain tuples (the row builder runs once per touched user).
_RATIOS: Final = tuple((r.name, r.numerator, r.denominator) for r in spec.RATIOS)
# (name, recent, long, recent tiles, earlier tiles): the formula of `spec.Trend`.
_TRENDS: Final = tuple((t.name, t.recent, t.long, *t.tiles()) for t in spec.TRENDS)


STATE_ENCODER: Final = msgspec.msgpack.Encoder()
STATE_DECODER: Final = msgspec.msgpack.Decoder(UserState)
