"""Online (incremental) feature engine: per-user tiles on event time, updated event by event.

Each user's state keeps, per tile granularity of the spec, the sums of the aggregates that
granularity needs (a dict tile index -> list of sums), the start and size of recent sessions,
the latest event, and the last applied Kafka offset per partition. Tiles older than the
longest window plus the allowed lateness are dropped, so no raw events are stored. The row
is built as of the user's latest event, with the semantics documented in `features.spec`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

from features import spec
from features.store import FeatureRow
from stream.events import Event

DUPLICATE: Final = 0
APPLIED: Final = 1
LATE: Final = 2


class UserState(msgspec.Struct, gc=False, array_like=True):
    """Everything the engine remembers of one user (serialised with msgpack between runs).

    `tiles[g]` maps a tile index of granularity g to the sums of `PLAN.slots[g]`;
    `sessions` maps a session id to [first event ts, events seen]; `offsets` maps a Kafka
    partition to the last offset applied for this user (replays at or below it are skipped).
    """

    last_ts: int = -1
    last_session: int = -1
    last_item: int = -1
    level_paid: int = 0
    registration: float | None = None
    tiles: list[dict[int, list[int]]] = msgspec.field(default_factory=list)
    sessions: dict[int, list[int]] = msgspec.field(default_factory=dict)
    offsets: dict[int, int] = msgspec.field(default_factory=dict)


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
        self.states: dict[str, UserState] = {}
        self._session_keep_ms = max(w.size_ms for w in spec.WINDOWS) + lateness_ms
        # The hot paths read plain tuples, not dataclass attributes (measured: about half of
        # `apply`'s time went to attribute and dict lookups on `_Granularity`).
        grans = self.plan.granularities
        self._n_grans = len(grans)
        self._tile_plan = tuple(
            (gi, g.ms, g.keep_tiles, len(g.slots), g.listen_slot, g.session_slot) for gi, g in enumerate(grans)
        )
        # page -> per granularity, the slots one event of that page adds 1 to (events + page counts).
        pages = set(spec_pages()) | {p for g in grans for p in g.page_slots}
        self._count_slots: dict[str, tuple[tuple[int, ...], ...]] = {
            page: tuple(_counted(g, page) for g in grans) for page in pages
        }
        self._other_page_slots = tuple(_counted(g, None) for g in grans)
        # Per granularity: its index, tile size, its slots' zero sums and window lengths (ascending).
        self._row_plan = tuple((gi, g.ms, [0] * len(g.slots), g.window_tiles) for gi, g in enumerate(grans))
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
        """Returns an empty state with one tile dict per granularity."""
        return UserState(tiles=[{} for _ in range(self._n_grans)])

    def apply(self, event: Event, partition: int = -1, offset: int = -1) -> int:
        """Applies one event to its user's state (created if absent).

        Returns APPLIED, DUPLICATE (offset already applied for this user and partition) or
        LATE (older than the user's latest event by more than the allowed lateness; ignored).
        """
        state = self.states.get(event.user_id)
        if state is None:
            state = self.states[event.user_id] = UserState(tiles=[{} for _ in range(self._n_grans)])
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
        count_slots = self._count_slots.get(page, self._other_page_slots)
        length = event.length
        listen_ms = round(length * 1000) if (length is not None and page == "NextSong") else 0
        all_tiles = state.tiles
        for gi, ms, keep, width, listen_slot, session_slot in self._tile_plan:
            tiles = all_tiles[gi]
            index = ts // ms
            tile = tiles.get(index)
            if tile is None:
                if len(tiles) >= keep:
                    _prune_tiles(tiles, index - keep)
                tile = tiles[index] = [0] * width
            for pos in count_slots[gi]:
                tile[pos] += 1
            if listen_ms and listen_slot >= 0:
                tile[listen_slot] += listen_ms
            if session_started and session_slot >= 0:
                tile[session_slot] += 1
                if moved_from >= 0:
                    old = tiles.get(moved_from // ms)
                    if old is not None:
                        old[session_slot] -= 1
        return APPLIED

    def _prune_sessions(self, state: UserState) -> None:
        horizon = state.last_ts - self._session_keep_ms
        for session_id in [s for s, (start, _) in state.sessions.items() if start < horizon]:
            del state.sessions[session_id]

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
        # Window sums grow from the smallest window outwards: each window adds only the tiles
        # between it and the previous one, so every tile is added once, in C (`map(sum, zip)`).
        # `flat` is every window's slot sums, one after the other.
        flat: list[int] = []
        all_tiles = state.tiles
        for gi, ms, zeros, windows in self._row_plan:
            current = last // ms
            items = all_tiles[gi].items()
            # The smallest window needs no upper bound: no tile is newer than the latest event's.
            oldest_out = current - windows[0]
            bucket = [tile for index, tile in items if index > oldest_out]
            running = list(map(sum, zip(*bucket, strict=True))) if bucket else zeros
            flat += running
            for n in windows[1:]:
                newest, oldest_out = oldest_out, current - n
                bucket = [tile for index, tile in items if oldest_out < index <= newest]
                if bucket:
                    running = list(map(sum, zip(running, *bucket, strict=True)))
                flat += running
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


def spec_pages() -> frozenset[str]:
    """Returns every page some aggregate of the spec filters on."""
    return frozenset(page for a in spec.AGGREGATES for page in (a.pages or ()))


def _counted(g: _Granularity, page: str | None) -> tuple[int, ...]:
    """Returns the slots of `g` one event of `page` adds 1 to (None: a page no aggregate names)."""
    positions = [g.events_slot] if g.events_slot >= 0 else []
    if page is not None:
        positions.extend(g.page_slots.get(page, ()))
    return tuple(positions)


def _prune_tiles(tiles: dict[int, list[int]], newest_dropped: int) -> None:
    for index in [i for i in tiles if i <= newest_dropped]:
        del tiles[index]


# The derived features of the spec as plain tuples (the row builder runs once per touched user).
_RATIOS: Final = tuple((r.name, r.numerator, r.denominator) for r in spec.RATIOS)
# (name, recent, long, recent tiles, earlier tiles): the formula of `spec.Trend`.
_TRENDS: Final = tuple((t.name, t.recent, t.long, *t.tiles()) for t in spec.TRENDS)


STATE_ENCODER: Final = msgspec.msgpack.Encoder()
STATE_DECODER: Final = msgspec.msgpack.Decoder(UserState)
